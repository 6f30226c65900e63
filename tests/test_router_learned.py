"""The learned token router: training (``--mode router``), its file, the loader, the ``learned`` scorer.

Short CPU runs of the one training command on the tests' tiny Flux and Wan write router files;
those load, attach to a clone of the MODEL (never the input), and drive the Elastic Token Router
through the real KSampler: exactly the budget's share of the image tokens on routed steps, one
ordering for every budget (a lower budget's kept set is a subset of a higher one's at the same
step), budget 1.0 the plain model bit for bit. Files of another family, other base weights, a
patch adapter or no router at all are refused with a message that says what to do.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import tiny_models
from test_router import count_block_tokens, ksample, recording_router, report, router, _snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

FLUX_ARGS = ["--mode", "router", "--model", "tiny-flux", "--size", "64", "--pool", "4", "--gen-batch", "4",
             "--batch", "4", "--log-every", "10", "--seed", "0", "--router-start", "0", "--device", "cpu"]
WAN_ARGS = ["--mode", "router", "--model", "tiny-wan", "--pool", "4", "--gen-batch", "4",
            "--batch", "4", "--log-every", "10", "--seed", "0", "--router-start", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def cli(pack):
    from elastic_tokens.training import cli

    return cli


@pytest.fixture(scope="module")
def trained(cli, tmp_path_factory):
    """Router files trained by the training command on tiny Flux and tiny Wan (a few steps each)."""
    out = tmp_path_factory.mktemp("routers")
    files = {}
    for family, args in (("flux", FLUX_ARGS), ("wan", WAN_ARGS)):
        path = out / f"tiny_{family}_router.safetensors"
        summary = cli.main(args + ["--steps", "40", "--out", str(path)])
        files[family] = (path, summary)
    return files


@pytest.fixture(scope="module")
def cases(pack, tiny_flux, tiny_wan):
    return {
        "flux": (tiny_flux, tiny_models.flux_conditioning(), tiny_models.flux_latent(64, 48), 1.0),
        "wan": (tiny_wan, tiny_models.wan_conditioning(), tiny_models.wan_latent(48, 64, 5), 4.0),
    }


def attached(model, path):
    from elastic_tokens.ideas.drop.router_file import attach_router, load_router

    return attach_router(model, load_router(path), path.name)


# ----------------------------------------------------------------------------- training and the file

@pytest.mark.parametrize("family", ["flux", "wan"])
def test_training_writes_a_small_loadable_router_with_the_base_fingerprint(trained, cases, family):
    from safetensors import safe_open

    from elastic_tokens.families import binding_for
    from elastic_tokens.ideas.drop.router_file import FORMAT, load_router
    from elastic_tokens.ideas.drop.router_net import FEATURES

    path, summary = trained[family]
    model = cases[family][0]
    assert path.stat().st_size < 100 * 1024 and summary["parameters"] < 20_000
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == FORMAT and meta["version"] == "1" and json.loads(meta["family"]) == family
    assert json.loads(meta["inputs"]) == list(FEATURES)
    training = json.loads(meta["training"])
    assert training["steps_done"] == 40 and training["loss"] == "rank" and training["records"] > 0
    fp = json.loads(meta["fingerprint"])
    assert set(fp) == set(binding_for(model).fingerprint_names) and fp
    router = load_router(path)
    assert router.spec.family == family and router.spec.native_patch == binding_for(model).native_patch
    # the held-out measure is there for every budget and the oracle bounds every ordering
    for row in summary["held_out_captured"].values():
        assert all(0.0 <= row[k] <= row["oracle"] + 1e-6 for k in ("learned", "ras", "context"))
    assert path.with_suffix(".json").is_file()


def test_training_lowers_the_ranking_loss(cli, tmp_path, capsys):
    """The loss logged over a longer run goes down: the network learns from the recorded errors."""
    cli.main(FLUX_ARGS + ["--steps", "120", "--log-every", "20", "--out", str(tmp_path / "r.safetensors")])
    losses = [float(line.split("loss")[1]) for line in capsys.readouterr().out.splitlines()
              if line.startswith("step ")]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_router_network_is_fully_convolutional(pack):
    """One network for any grid: Flux (one frame) and Wan (frames x rows x cols), any size; each
    frame is routed from itself (3x3 convolutions within a frame)."""
    from elastic_tokens.ideas.drop.router_net import RouterNet, router_features

    torch.manual_seed(0)
    net = RouterNet(2 * 16 * 4 + 3)
    torch.nn.init.normal_(net.out.weight)
    for shape in ((2, 16, 6, 10), (1, 16, 3, 4, 8), (1, 16, 5, 7)):   # odd sizes are padded up
        z0, z1 = torch.randn(shape), torch.randn(shape)
        feats = router_features(z0, z1, 0.9, 0.8, 2)
        t = shape[2] if len(shape) == 5 else 1
        grid = (t, -(-shape[-2] // 2), -(-shape[-1] // 2))
        assert feats.shape == (shape[0], grid[0] * grid[1] * grid[2], net.features)
        logits = net(feats, grid)
        assert logits.shape == feats.shape[:2] and torch.isfinite(logits).all()
    # frames do not see each other: changing frame 0 leaves frame 1's logits alone
    z0, z1 = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 16, 2, 4, 4)
    a = net(router_features(z0, z1, 0.9, 0.8, 2), (2, 2, 2))
    z1[:, :, 0] += 1.0
    b = net(router_features(z0, z1, 0.9, 0.8, 2), (2, 2, 2))
    assert not torch.equal(a[:, :4], b[:, :4]) and torch.equal(a[:, 4:], b[:, 4:])


# ----------------------------------------------------------------------------- the learned scorer

@pytest.mark.parametrize("family", ["flux", "wan"])
def test_learned_scorer_keeps_exactly_the_budgets_tokens(trained, cases, family):
    from elastic_tokens.families import binding_for
    from elastic_tokens.kernels.token_scores import budget_tokens

    model, (pos, neg), latent, cfg = cases[family]
    binding = binding_for(model)
    n = binding.grid_tokens(latent["samples"].shape)
    key = binding.block_keys[-1]
    counted, seen = count_block_tokens(attached(model, trained[family][0]), key)
    for budget in (0.3, 0.5):
        seen.clear()
        routed = router(counted, budget=budget, scorer="learned", start_percent=0.0, refresh_every=3)
        out = ksample(routed, pos, neg, latent, cfg=cfg)
        k = budget_tokens(budget, n)
        rep = report(routed)
        assert torch.isfinite(out).all() and k < n
        assert rep.step_tokens == [n, k, k, n, k, k]
        text = pos[0][0].shape[1] if key in binding.text_first_blocks else 0
        assert seen == [text + t for t in rep.step_tokens]
        assert "scorer learned" in rep.summary()


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_learned_budget_one_is_the_plain_model_and_the_input_model_is_untouched(trained, cases, family):
    model, (pos, neg), latent, cfg = cases[family]
    before = _snapshot(model)
    base = ksample(model, pos, neg, latent, cfg=cfg)
    with_router = attached(model, trained[family][0])
    assert with_router is not model and _snapshot(model) == before
    full = router(with_router, budget=1.0, scorer="learned", start_percent=0.0, refresh_every=0)
    assert torch.equal(ksample(full, pos, neg, latent, cfg=cfg), base)
    routed = router(with_router, budget=0.5, scorer="learned", start_percent=0.0, refresh_every=0)
    assert not torch.equal(ksample(routed, pos, neg, latent, cfg=cfg), base)
    assert _snapshot(model) == before and report(model) is None
    assert torch.equal(ksample(model, pos, neg, latent, cfg=cfg), base)


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_one_learned_ordering_serves_every_budget(trained, cases, family):
    """At the first routed step (same trajectory so far at every budget) a lower budget keeps a
    subset of a higher budget's tokens; and the learned ordering is not the ras one."""
    model, (pos, neg), latent, cfg = cases[family]
    with_router = attached(model, trained[family][0])
    kept = {}
    for scorer in ("learned", "ras"):
        for budget in (0.2, 0.5, 0.8):
            runs = []
            ksample(recording_router(with_router, runs, budget=budget, scorer=scorer, start_percent=0.0,
                                     refresh_every=0, starvation=0.0), pos, neg, latent, cfg=cfg)
            kept[scorer, budget] = set(runs[0].kept[1].tolist())
    assert kept["learned", 0.2] < kept["learned", 0.5] < kept["learned", 0.8]
    assert kept["learned", 0.5] != kept["ras", 0.5]


# ----------------------------------------------------------------------------- errors

def test_files_of_another_family_model_or_format_are_refused(trained, cases, tmp_path):
    from safetensors.torch import save_file

    from elastic_tokens.families import binding_for
    from elastic_tokens.ideas.drop.router_file import RouterFileError, load_router, save_router
    from elastic_tokens.ideas.patch.adapter_file import fingerprint

    tiny_flux, tiny_wan = cases["flux"][0], cases["wan"][0]
    flux_file = trained["flux"][0]
    with pytest.raises(RouterFileError, match="trained for a FLUX model; this MODEL is WAN"):
        attached(tiny_wan, flux_file)
    # the same architecture with other weights: the fingerprint differs
    router = load_router(flux_file)
    other = tiny_models.random_weights(tiny_models._flux_shapes(), seed=11)
    names = binding_for(tiny_flux).fingerprint_names
    spec = dataclasses.replace(router.spec, fingerprint=fingerprint({n: other[n] for n in names}))
    path = save_router(router.net, spec, tmp_path / "other.safetensors")
    with pytest.raises(RouterFileError, match="trained on other base weights than this MODEL .*--mode router"):
        attached(tiny_flux, path)
    # a patch adapter given as a router
    from test_patch_adapter import make_adapter
    from elastic_tokens.ideas.patch.adapter_file import save_adapter

    adapter = save_adapter(make_adapter(tiny_flux), tmp_path / "adapter.safetensors")
    with pytest.raises(RouterFileError, match="is a patch adapter, not a token router.*Load Patch Adapter"):
        load_router(adapter)
    # no metadata, another suffix, damaged values, a newer format
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(RouterFileError, match="not an Elastic Tokens token router"):
        load_router(tmp_path / "plain.safetensors")
    with pytest.raises(RouterFileError, match=".safetensors files only"):
        load_router(tmp_path / "router.ckpt")
    net = router.net
    bad = dataclasses.replace(router.spec)
    broken = save_router(net, bad, tmp_path / "nan.safetensors")
    from safetensors.torch import load_file
    tensors = load_file(str(broken))
    tensors["net.out.bias"] = torch.tensor([float("nan")])
    save_file(tensors, str(broken), metadata=bad.to_metadata())
    with pytest.raises(RouterFileError, match="NaN/inf"):
        load_router(broken)
    newer = {**router.spec.to_metadata(), "version": "9"}
    save_file(load_file(str(flux_file)), str(tmp_path / "newer.safetensors"), metadata=newer)
    with pytest.raises(RouterFileError, match="format version '9'"):
        load_router(tmp_path / "newer.safetensors")


def test_learned_scorer_without_a_router_says_what_to_add(cases):
    from elastic_tokens.ideas.drop.router_file import RouterFileError
    from elastic_tokens.nodes.elastic_token_router import ElasticTokenRouter

    model, (pos, neg), latent, cfg = cases["flux"]
    with pytest.raises(RouterFileError, match="put a 'Load Token Router' node"):
        ElasticTokenRouter.execute(model, 0.5, "learned", "cache", 0.0, 1.0, 0)
    with pytest.raises(RouterFileError, match="put a 'Load Token Router' node"):
        ksample(router(model, budget=0.5, scorer="learned", start_percent=0.0), pos, neg, latent, cfg=cfg)
    # budget 1.0 never routes: nothing to rank, no router needed
    ElasticTokenRouter.execute(model, 1.0, "learned", "cache", 0.0, 1.0, 0)


def test_load_token_router_node(trained, cases, tmp_path, monkeypatch):
    import folder_paths

    from elastic_tokens.ideas.drop.router_file import ROUTER_KEY, RouterFileError, TokenRouter
    from elastic_tokens.nodes.load_patch_adapter import FOLDER
    from elastic_tokens.nodes.load_token_router import LoadTokenRouter

    folder = tmp_path / "models" / FOLDER
    folder.mkdir(parents=True)
    (folder / "tiny_flux_router.safetensors").write_bytes(trained["flux"][0].read_bytes())
    (folder / "old.ckpt").write_bytes(b"not listed")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, FOLDER, ([str(folder)], {".safetensors"}))
    schema = LoadTokenRouter.define_schema()
    assert schema.node_id == "ElasticTokensLoadTokenRouter"
    inputs = {i.id: i for i in schema.inputs}
    assert list(inputs) == ["model", "router_name"] and all(i.tooltip for i in schema.inputs)
    assert inputs["router_name"].options == ["tiny_flux_router.safetensors"]
    model, (pos, neg), latent, cfg = cases["flux"]
    out = LoadTokenRouter.execute(model, "tiny_flux_router.safetensors").result[0]
    assert isinstance(out.model_options["transformer_options"][ROUTER_KEY], TokenRouter)
    assert ROUTER_KEY not in model.model_options.get("transformer_options", {})
    with pytest.raises(RouterFileError, match="trained for a FLUX model"):
        LoadTokenRouter.execute(cases["wan"][0], "tiny_flux_router.safetensors")
    with pytest.raises(RouterFileError, match="no router selected"):
        LoadTokenRouter.execute(model, "")

    import asyncio

    from elastic_tokens.nodes.extension import ElasticTokensExtension

    assert LoadTokenRouter in asyncio.run(ElasticTokensExtension().get_node_list())


def test_learned_scores_grow_with_the_age_of_the_cached_output(trained, cases, monkeypatch):
    """The router predicts a token's drift per step; the planner multiplies it by the age of the
    token's cached output (skipped k times in a row: k + 1 steps old) before the starvation term."""
    from elastic_tokens.ideas.drop import planner as planner_module

    model, (pos, neg), latent, cfg = cases["flux"]
    raw, weighted = [], []
    original_scores, original_starved = planner_module.RouterRun._scores, planner_module.ks.starved

    def scores(self, step):
        out = original_scores(self, step)
        raw.append(None if out is None else out.clone())
        return out

    def starved(s, skipped, rate=0.1):
        weighted.append((s.clone(), skipped.clone()))
        return original_starved(s, skipped, rate)
    monkeypatch.setattr(planner_module.RouterRun, "_scores", scores)
    monkeypatch.setattr(planner_module.ks, "starved", starved)
    routed = router(attached(model, trained["flux"][0]), budget=0.5, scorer="learned", start_percent=0.0,
                    refresh_every=0, starvation=0.0)
    ksample(routed, pos, neg, latent, cfg=cfg)
    assert len(weighted) == 5 and raw[0] is None       # step 0 dense; steps 1..5 routed
    for (s, skipped), r in zip(weighted, raw[1:]):
        assert torch.allclose(s, r * (skipped + 1))
    assert all(bool((skipped > 0).any()) for _, skipped in weighted[1:])  # aged tokens were weighted


def test_bench_quality_runs_the_learned_router_from_a_file(trained, cases):
    """bench/bench_quality.py's ``router=B/scorer=learned`` attaches ``--router-file`` (and says so
    when it is missing)."""
    import argparse
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_quality

    tiny_flux = cases["flux"][0]
    (setting,) = bench_quality.parse_settings("router=0.5/scorer=learned/start=0/refresh=0@6", 8, 0.4, False)
    provider = bench_quality.TinyFluxProvider(argparse.Namespace(size=64))
    provider._model = tiny_flux
    args = argparse.Namespace(batch=1, warmup=0, router_file=str(trained["flux"][0]))
    res = bench_quality.run_setting(provider, tiny_flux, setting, [5], args, None)
    n = res["reports"][0]["step_tokens"][0]
    assert res["reports"][0]["step_tokens"] == [n] + [n // 2] * 5
    with pytest.raises(SystemExit, match="needs --router-file"):
        bench_quality.run_setting(provider, tiny_flux, setting, [5], argparse.Namespace(batch=1, warmup=0,
                                                                                      router_file=None), None)


def test_age_weighting_is_every_scorers_default_and_can_be_turned_off(pack):
    import sys
    from pathlib import Path

    from elastic_tokens.ideas.drop.config import RouterConfig

    assert RouterConfig(scorer="learned").ages_scores and RouterConfig(scorer="ras").ages_scores
    assert not RouterConfig(scorer="ras", age_weight=False).ages_scores
    assert not RouterConfig(scorer="learned", age_weight=False).ages_scores
    with pytest.raises(ValueError, match="age_weight must be true, false or None"):
        RouterConfig(age_weight="yes")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_speed

    assert bench_speed.parse_router("router=0.5/age=1")["age_weight"] is True
    with pytest.raises(ValueError, match="write age=1"):
        bench_speed.parse_router("router=0.5/age=yes")


def test_learned_scorer_with_a_batch_and_cfg(trained, cases):
    """Batch 2 with CFG: one kept set per sample and step from its own scores, the budget's count,
    finite output; the kept sets follow the samples (the two samples, and other noise, differ)."""
    from elastic_tokens.families import binding_for
    from elastic_tokens.kernels.token_scores import budget_tokens

    model, (pos, neg), _, _ = cases["flux"]
    with_router = attached(model, trained["flux"][0])
    latent = tiny_models.flux_latent(64, 48, batch=2)
    n = binding_for(model).grid_tokens(latent["samples"].shape)
    kept = []
    for seed in (3, 4):
        runs = []
        out = ksample(recording_router(with_router, runs, budget=0.5, scorer="learned", start_percent=0.0,
                                       refresh_every=0, starvation=0.0), pos, neg, latent, cfg=2.0, seed=seed)
        assert torch.isfinite(out).all() and out.shape[0] == 2
        assert all(k.shape == (2, budget_tokens(0.5, n)) for k in runs[0].kept.values())
        assert any(not torch.equal(k[0], k[1]) for k in runs[0].kept.values())
        kept.append(set(runs[0].kept[1][0].tolist()))
    assert kept[0] != kept[1]


def test_load_token_router_is_listed_by_a_real_server(comfy_server):
    info = comfy_server.object_info("ElasticTokensLoadTokenRouter")["ElasticTokensLoadTokenRouter"]
    assert info["display_name"] == "Load Token Router" and info["output"] == ["MODEL"]
    assert list(info["input"]["required"]) == ["model", "router_name"]
    router = comfy_server.object_info("ElasticTokensTokenRouter")["ElasticTokensTokenRouter"]
    scorer = router["input"]["required"]["scorer"]
    assert "learned" in (scorer[0] if scorer[0] != "COMBO" else scorer[1]["options"])


@pytest.mark.parametrize("proxy", ["image", "detail", "video"])
def test_the_committed_proxy_routers_fit_the_committed_proxies(proxy, pack, one_thread):
    """Each committed proxy router passes the loader's checks (family, patch, base-weight
    fingerprint) against the proxy weights in the tree: retrained proxy weights need retrained
    routers (the detail proxy's were, once, and the old router was refused)."""
    import importlib.util
    from pathlib import Path

    from elastic_tokens.families import binding_for
    from elastic_tokens.ideas.drop.router_file import check_router, load_router

    root = Path(__file__).resolve().parents[1] / "benchmarks/proxy"
    spec = importlib.util.spec_from_file_location(f"{proxy}_provider_for_router_test", root / f"{proxy}_provider.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.make_provider().load()
    check_router(model, load_router(root / "routers" / f"{proxy}_proxy_router.safetensors"), binding_for(model),
                 f"{proxy}_proxy_router")


def test_a_loader_lists_its_own_kind_and_files_it_cannot_tell(tmp_path, pack):
    """Adapters, routers and merge patterns share models/elastic_tokens: a loader's dropdown leaves
    out the pack's files of another kind, keeps files without the pack's metadata (picking one gets
    the loader's own message) and does not fail on an unreadable file."""
    from safetensors.torch import save_file

    from elastic_tokens.ideas.learned_file import file_format, listed_for

    t = {"w": torch.zeros(1)}
    save_file(t, str(tmp_path / "r.safetensors"), metadata={"format": "elastic_tokens.token_router"})
    save_file(t, str(tmp_path / "a.safetensors"), metadata={"format": "elastic_tokens.patch_adapter"})
    save_file(t, str(tmp_path / "plain.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 4)
    names = ["r.safetensors", "a.safetensors", "plain.safetensors", "broken.safetensors"]
    assert file_format(tmp_path / "r.safetensors") == "elastic_tokens.token_router"
    assert file_format(tmp_path / "broken.safetensors") is None
    assert listed_for("elastic_tokens.token_router", names, lambda n: tmp_path / n) == \
        ["r.safetensors", "plain.safetensors", "broken.safetensors"]
    assert listed_for("elastic_tokens.patch_adapter", names, lambda n: tmp_path / n) == \
        ["a.safetensors", "plain.safetensors", "broken.safetensors"]
    assert listed_for("elastic_tokens.token_router", names, lambda n: None) == names  # folder gone
