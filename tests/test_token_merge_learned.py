"""Token Merge with a learned pattern (issue 14, LGM): clustering, training mode, file, loader.

The clustering kernel (kernels/merge_cluster.py) is checked as data: it is average linkage (the
heights of scipy's), deterministic, keeps groups inside their blocks, reaches the ratio's exact
token count, and joins identical embeddings first. The embedding training (training/pattern.py)
must find groups a synthetic field is constant on, which the training-free squares cut across.
The training command's ``--mode pattern`` runs on the tests' tiny Flux and Wan and writes a file
that the "Load Merge Pattern" node attaches; Token Merge with order ``learned`` then merges through
the real KSampler to the ratio's token count, ratio 0 stays the plain model bit for bit, the input
MODEL is never changed, and files of another family, grid, base weights or format are refused
with a message that says which.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from comfy_runtime import load_pack

load_pack()  # the repo as package ``elastic_tokens``; the kernels import no ComfyUI

from elastic_tokens.kernels import merge_cluster as mc  # noqa: E402
from elastic_tokens.kernels import merge_pattern as mp  # noqa: E402

import tiny_models  # noqa: E402
from node_runs import ksample, options_snapshot, token_merge  # noqa: E402


# -- the clustering kernel (pure torch) -----------------------------------------------------------

def test_kernel_imports_no_comfyui():
    source = open(mc.__file__).read()
    assert "import comfy" not in source and "from comfy" not in source


def test_average_linkage_heights_are_scipys():
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    distance = pytest.importorskip("scipy.spatial.distance")
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)).double()
    condensed = distance.pdist(x.numpy(), "cosine")
    pairs, heights = mc.average_linkage(torch.tensor(distance.squareform(condensed)).unsqueeze(0))
    expected = torch.tensor(hierarchy.linkage(condensed, "average")[:, 2])
    assert torch.allclose(heights[0], expected, atol=1e-9)
    assert (pairs[0, :, 0] < pairs[0, :, 1]).all()


def test_ward_linkage_heights_are_scipys():
    """Ward: on squared distances, each join's height is scipy's Ward distance squared (twice the
    within-cluster sum of squares the join adds)."""
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    distance = pytest.importorskip("scipy.spatial.distance")
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(7)).double()
    squared = torch.tensor(distance.squareform(distance.pdist(x.numpy(), "sqeuclidean")))
    _, heights = mc.agglomerate(squared.unsqueeze(0), "ward")
    expected = torch.tensor(hierarchy.linkage(x.numpy(), "ward")[:, 2]) ** 2
    assert torch.allclose(heights[0], expected, rtol=1e-9)
    with pytest.raises(ValueError, match="linkage must be one of"):
        mc.agglomerate(squared.unsqueeze(0), "single")


@pytest.mark.parametrize("grid,mode", [((1, 16, 16), "within_frames"), ((1, 6, 10), "within_frames"),
                                       ((9, 8, 8), "within_frames"), ((9, 8, 8), "across_frames"),
                                       ((5, 6, 6), "both")])
def test_counts_match_the_ratio_and_groups_stay_in_their_blocks(grid, mode):
    n = grid[0] * grid[1] * grid[2]
    e = torch.randn(n, 8, generator=torch.Generator().manual_seed(1))
    den = mc.Dendrograms.from_embedding(e, grid, mode, 4)
    block_of = torch.full((n,), -1, dtype=torch.long)
    for b, row in enumerate(den.cells.tolist()):
        for t in row:
            if t >= 0:
                block_of[t] = b
    assert (block_of >= 0).all()  # the blocks cover the grid once
    for ratio in (0.0, 0.1, 0.25, 0.5, 0.75):
        groups, sizes = den.pattern(ratio)
        # exact, as the training-free patterns, except where partial time blocks cannot merge more
        assert sizes.numel() == max(round(n * (1 - ratio)), n - den.max_merges)
        assert torch.equal(torch.bincount(groups), sizes)
        firsts = [int(torch.nonzero(groups == k)[0]) for k in range(sizes.numel())]
        assert firsts == sorted(firsts)  # numbered by first token, as merge_pattern's
        for k in range(sizes.numel()):
            assert block_of[groups == k].unique().numel() == 1
    if grid == (1, 16, 16):
        assert den.max_merges == n - n // 16  # every 4x4 block can become one token


def test_deterministic_and_identical_embeddings_merge_first():
    grid = (1, 8, 8)
    e = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    twins = [(0, 9), (5, 6), (36, 45), (50, 58)]  # pairs inside one 4x4 block each
    for a, b in twins:
        e[b] = e[a] * 3.0  # the same direction: cosine distance 0
    g1, s1 = mc.cluster_pattern(e, grid, 4 / 64)
    g2, s2 = mc.cluster_pattern(e.clone(), grid, 4 / 64)
    assert torch.equal(g1, g2) and torch.equal(s1, s2)
    assert sorted(tuple(torch.nonzero(g1 == k).flatten().tolist()) for k in range(s1.numel()) if s1[k] > 1) \
        == sorted(twins)
    # ratio 0 is the identity
    g0, s0 = mc.cluster_pattern(e, grid, 0.0)
    assert torch.equal(g0, torch.arange(64)) and torch.equal(s0, torch.ones(64, dtype=torch.long))


def test_homogeneous_blocks_merge_more():
    """One global cut: a block whose embeddings all agree gives more of the ratio's merges than
    a block of scattered ones."""
    grid = (1, 4, 8)
    e = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
    left = [y * 8 + x for y in range(4) for x in range(4)]
    e[left] = e[0] + 0.01 * e[left]
    groups, sizes = mc.cluster_pattern(e, grid, 0.5)
    assert groups[left].unique().numel() == 1


def test_max_group_caps_the_group_size():
    e = torch.randn(256, 8, generator=torch.Generator().manual_seed(6))
    e[:] = e[0]  # all alike: unbounded, every block merges into one group of 13 (3 merges of 15 left)
    free = mc.Dendrograms.from_embedding(e, (16, 16), "within_frames", 4)
    assert int(free.pattern(0.75)[1].max()) == 13
    capped = mc.Dendrograms.from_embedding(e, (16, 16), "within_frames", 4, max_size=4)
    groups, sizes = capped.pattern(0.75)
    assert sizes.numel() == 64 and int(sizes.max()) == 4


def test_within_group_sum_is_the_groups_squared_deviation():
    grid = (1, 4, 4)
    f = torch.randn(3, 16, 5, generator=torch.Generator().manual_seed(4)).double()
    cells = mc.block_cells(grid, (1, 4, 4))
    d = ((f[:, cells[0]].unsqueeze(2) - f[:, cells[0]].unsqueeze(1)) ** 2).sum((0, -1)).unsqueeze(0)
    groups, sizes = mp.merge_pattern((4, 4), 0.5)
    means = torch.zeros(3, sizes.numel(), 5, dtype=torch.float64).index_add_(1, groups, f) / sizes.view(1, -1, 1)
    direct = float(((f - means[:, groups]) ** 2).sum())
    assert mc.within_group_sum(d, cells, groups) == pytest.approx(direct, rel=1e-9)


# -- training the embedding (no model) -------------------------------------------------------------

def test_the_embedding_finds_the_regions_a_field_is_constant_on():
    """Features constant on irregular 4-token regions (L shapes and diagonals, no 2x2 square) of
    each 4x4 block: the learned pattern at ratio 0.75 merges exactly those regions (near-zero
    cost), while the training-free squares cut across them."""
    from elastic_tokens.training.pattern import PairStats, PatternConfig, train_embedding
    from elastic_tokens.ideas.merge.learned_pattern import LearnedPattern, PatternSpec

    grid = (1, 8, 8)
    region_of_block = torch.tensor([[0, 0, 0, 1], [0, 2, 1, 1], [2, 2, 3, 1], [2, 3, 3, 3]])
    region = torch.zeros(8, 8, dtype=torch.long)
    for by in range(2):
        for bx in range(2):
            region[4 * by:4 * by + 4, 4 * bx:4 * bx + 4] = region_of_block + 4 * (2 * by + bx)
    region = region.flatten()
    gen = torch.Generator().manual_seed(5)
    cells = mc.block_cells(grid, (1, 4, 4))
    stats = PairStats(cells)
    for _ in range(20):
        values = torch.randn(2, 16, 6, generator=gen)
        stats.add("denoised", values[:, region] + 0.05 * torch.randn(2, 64, 6, generator=gen))
        stats.calls += 2
    d = stats.mean("denoised")
    d = (d / d[d > 0].mean()).float()
    cfg = PatternConfig(dim=8, steps=150, log_every=0)
    e = train_embedding(grid, cells, d, cfg, log=lambda m: None)
    spec = PatternSpec("flux", grid, 2, 1, 16, 64, 8)
    groups, sizes = LearnedPattern(spec, e.reshape(1, 8, 8, 8)).pattern(grid, 0.75)
    assert sizes.numel() == 16
    assert all(region[groups == k].unique().numel() == 1 for k in range(16))
    learned = mc.within_group_sum(stats.mean("denoised"), cells, groups)
    spread = mc.within_group_sum(stats.mean("denoised"), cells, mp.merge_pattern(grid, 0.75)[0])
    assert learned < 0.05 * spread


def test_shrinkage_is_chosen_on_split_halves():
    """Blocks of different layouts keep their own distances (never the block average alone); a
    layout shared by all blocks under heavy noise leans on the block average."""
    from elastic_tokens.training.pattern import PairStats, PatternConfig, choose_shrink

    grid = (1, 8, 8)
    cells = mc.block_cells(grid, (1, 4, 4))
    gen = torch.Generator().manual_seed(0)

    def halves(make, n):
        out = []
        for _ in range(2):
            st = PairStats(cells)
            for _ in range(n):
                st.add("denoised", make())
                st.calls += 1
            out.append(st)
        return out

    layout = torch.tensor([[0, 0, 0, 1], [0, 2, 1, 1], [2, 2, 3, 1], [2, 3, 3, 3]])
    region = torch.zeros(8, 8, dtype=torch.long)
    for by in range(2):
        for bx in range(2):
            own = layout if (by + bx) % 2 == 0 else layout.t()
            region[4 * by:4 * by + 4, 4 * bx:4 * bx + 4] = own + 4 * (2 * by + bx)
    region = region.flatten()
    a, b = halves(lambda: torch.randn(1, 16, 6, generator=gen)[:, region] + 0.1 * torch.randn(1, 64, 6, generator=gen), 10)
    alpha, table = choose_shrink(a, b, grid, PatternConfig())
    assert alpha < 1 and table["1"] > 5 * table["0"]

    def rows():  # every token of a row alike, under noise as strong as the signal
        v = torch.randn(1, 8, 1, 6, generator=gen).expand(1, 8, 8, 6).reshape(1, 64, 6)
        return v + torch.randn(1, 64, 6, generator=gen)
    a, b = halves(rows, 3)
    alpha, table = choose_shrink(a, b, grid, PatternConfig())
    assert alpha >= 0.5 and table[f"{alpha:g}"] < table["0"]


# -- the training command and the loader, through the real ComfyUI --------------------------------

FLUX_ARGS = ["--mode", "pattern", "--model", "tiny-flux", "--size", "128", "--pool", "2", "--val-n", "2",
             "--gen-batch", "1", "--steps", "30", "--log-every", "10", "--seed", "0", "--device", "cpu"]
WAN_ARGS = ["--mode", "pattern", "--model", "tiny-wan", "--size", "64", "--pool", "2", "--val-n", "1",
            "--gen-batch", "2", "--steps", "20", "--log-every", "10", "--seed", "0", "--device", "cpu",
            "--pattern-video-mode", "both"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cli(pack):
    from elastic_tokens.training import cli

    return cli


@pytest.fixture(scope="module")
def flux_pattern(cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("flux_pattern") / "tiny_flux_pattern.safetensors"
    summary = cli.main(FLUX_ARGS + ["--out", str(out)])
    return out, summary


@pytest.fixture(scope="module")
def wan_pattern(cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("wan_pattern") / "tiny_wan_pattern.safetensors"
    summary = cli.main(WAN_ARGS + ["--out", str(out)])
    return out, summary


def test_training_writes_a_loadable_pattern_with_the_fingerprint(flux_pattern, tiny_flux):
    from safetensors import safe_open

    from elastic_tokens.families import binding_for
    from elastic_tokens.ideas.merge.learned_pattern import FORMAT, load_pattern
    from elastic_tokens.ideas.patch.adapter_file import base_fingerprint, fingerprint_problems

    path, summary = flux_pattern
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert list(f.keys()) == ["embedding"]
    assert meta["format"] == FORMAT and json.loads(meta["grid"]) == [1, 8, 8]
    pattern = load_pattern(path)
    spec = pattern.spec
    assert spec.family == "flux" and spec.dim == 16 and pattern.embedding.shape == (1, 8, 8, 16)
    assert spec.fingerprint and not fingerprint_problems(spec.fingerprint, base_fingerprint(tiny_flux, binding_for(tiny_flux)))
    costs = spec.training["validation"]["costs"]
    assert set(costs) == {"denoised", "velocity"} and set(costs["denoised"]["0.5"]) == {"spread", "border_first", "learned"}
    assert all(v >= 0 for rows in costs.values() for row in rows.values() for v in row.values())
    assert summary["samples"] == 2 and path.with_suffix(".json").is_file()
    # two rollout batches: the shrinkage was chosen on the two halves
    assert set(spec.training["shrink_split_half"]) == {"0", "0.25", "0.5", "0.75", "1"}
    assert spec.training["shrink"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_learned_merge_reaches_the_ratio_and_ratio_zero_is_the_plain_model(flux_pattern, tiny_flux):
    from elastic_tokens import last_run_report
    from elastic_tokens.ideas.merge.learned_pattern import attach_merge_pattern, load_pattern

    model = tiny_flux
    pos, neg = tiny_models.flux_conditioning()
    latent = tiny_models.flux_latent(128, 128)
    before = options_snapshot(model)
    base = ksample(model, pos, neg, latent)
    with_pattern = attach_merge_pattern(model, load_pattern(flux_pattern[0]))
    assert with_pattern is not model and options_snapshot(model) == before
    off = token_merge(with_pattern, ratio=0.0, order="learned")
    assert torch.equal(ksample(off, pos, neg, latent), base)
    n = 64
    for ratio in (0.25, 0.5):
        merged = token_merge(with_pattern, ratio=ratio, order="learned")
        out = ksample(merged, pos, neg, latent)
        rep = last_run_report(merged)
        assert rep.step_tokens == [round(n * (1 - ratio))] * 6 and not rep.fallbacks
        assert torch.isfinite(out).all() and not torch.equal(out, base)
    # the loader may also come after Token Merge: the pattern is read when sampling starts
    after = attach_merge_pattern(token_merge(model, ratio=0.5, order="learned"), load_pattern(flux_pattern[0]))
    assert torch.equal(ksample(after, pos, neg, latent), ksample(merged, pos, neg, latent))
    assert options_snapshot(model) == before and torch.equal(ksample(model, pos, neg, latent), base)


def test_learned_merge_stacks_with_the_patch_schedule_and_cfg(flux_pattern, tiny_flux):
    """Coarse steps of a Dynamic Patch Schedule are not merged (their grid is not the pattern's),
    native ones are, in either graph order, with CFG on a batch of 2."""
    from elastic_tokens import last_run_report
    from elastic_tokens.ideas.merge.learned_pattern import attach_merge_pattern, load_pattern
    from elastic_tokens.ideas.patch import apply_patch_schedule
    from elastic_tokens.ideas.patch.config import PatchScheduleConfig

    pos, neg = tiny_models.flux_conditioning(batch=2)
    latent = tiny_models.flux_latent(128, 128, batch=2)
    model = attach_merge_pattern(tiny_flux, load_pattern(flux_pattern[0]))
    sched = PatchScheduleConfig(forced_schedule="2x3")
    outs = []
    for build in (lambda m: token_merge(apply_patch_schedule(m, sched), ratio=0.5, order="learned"),
                  lambda m: apply_patch_schedule(token_merge(m, ratio=0.5, order="learned"), sched)):
        stacked = build(model)
        outs.append(ksample(stacked, pos, neg, latent, cfg=2.0))
        rep = last_run_report(stacked)
        assert rep.step_factors == [2, 2, 2, 1, 1, 1] and rep.step_merged == [0, 0, 0, 32, 32, 32]
        assert not rep.fallbacks and torch.isfinite(outs[-1]).all()
    assert torch.equal(outs[0], outs[1])


def test_wan_training_and_learned_merge_within_and_across_frames(wan_pattern, tiny_wan):
    from elastic_tokens import last_run_report
    from elastic_tokens.ideas.merge.learned_pattern import attach_merge_pattern, load_pattern

    path, summary = wan_pattern
    pattern = load_pattern(path)
    assert pattern.spec.family == "wan" and pattern.spec.grid == (2, 4, 4) and pattern.spec.video_mode == "both"
    pos, neg = tiny_models.wan_conditioning()
    latent = tiny_models.wan_latent(64, 64, 5)  # 2 latent frames, as the tiny-wan provider
    model = attach_merge_pattern(tiny_wan, pattern)
    for mode in ("within_frames", "both"):
        merged = token_merge(model, ratio=0.5, order="learned", video_mode=mode)
        ksample(merged, pos, neg, latent, cfg=2.0)
        assert last_run_report(merged).step_tokens == [16] * 6


def test_clear_errors_for_another_family_grid_weights_or_format(flux_pattern, wan_pattern, tiny_flux, tiny_wan,
                                                                tmp_path):
    from elastic_tokens.ideas.merge.learned_pattern import (LearnedPattern, PatternError, PatternSpec,
                                                            attach_merge_pattern, load_pattern, save_pattern)
    from elastic_tokens.ideas.patch.adapter_file import AdapterSpec, PatchAdapter, save_adapter
    from elastic_tokens.families import binding_for

    flux = load_pattern(flux_pattern[0])
    with pytest.raises(PatternError, match="trained for a FLUX model; this MODEL is WAN"):
        attach_merge_pattern(tiny_wan, flux)
    with pytest.raises(PatternError, match="trained for a WAN model; this MODEL is FLUX"):
        attach_merge_pattern(tiny_flux, load_pattern(wan_pattern[0]))
    # another grid: says which grid the pattern is for and which this run has
    model = token_merge(attach_merge_pattern(tiny_flux, flux), ratio=0.5, order="learned")
    pos, neg = tiny_models.flux_conditioning()
    with pytest.raises(PatternError, match="trained for a token grid of 8x8 tokens; this run has 4x4 tokens"):
        ksample(model, pos, neg, tiny_models.flux_latent(64, 64))
    # order learned without a pattern
    with pytest.raises(PatternError, match="needs a merge pattern.*Load Merge Pattern"):
        ksample(token_merge(tiny_flux, ratio=0.5, order="learned"), pos, neg, tiny_models.flux_latent(128, 128))
    # other base weights
    stored = {k: {**v, "values": [-x for x in v["values"]]} for k, v in flux.spec.fingerprint.items()}
    spec = PatternSpec(**{**flux.spec.__dict__, "fingerprint": stored})
    with pytest.raises(PatternError, match="other base weights"):
        attach_merge_pattern(tiny_flux, LearnedPattern(spec, flux.embedding, "other.safetensors"))
    # a patch adapter given as a pattern, and other files
    adapter = PatchAdapter(AdapterSpec.for_model(tiny_flux, binding_for(tiny_flux), (2,), rank=2))
    save_adapter(adapter, tmp_path / "adapter.safetensors")
    with pytest.raises(PatternError, match="is a patch adapter, not a merge pattern.*Load Patch Adapter"):
        load_pattern(tmp_path / "adapter.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(PatternError, match="not a readable safetensors file"):
        load_pattern(tmp_path / "junk.safetensors")
    with pytest.raises(PatternError, match=".safetensors files only"):
        load_pattern(tmp_path / "pattern.pt")
    bad = LearnedPattern(flux.spec, flux.embedding.clone(), "x")
    bad.embedding[0, 0, 0, 0] = float("nan")
    save_pattern(bad, tmp_path / "nan.safetensors")
    with pytest.raises(PatternError, match="NaN/inf"):
        load_pattern(tmp_path / "nan.safetensors")


def test_the_loader_node_attaches_a_pattern_from_the_models_folder(flux_pattern, tiny_flux, tmp_path, monkeypatch):
    import asyncio

    import folder_paths

    from elastic_tokens.ideas.merge.learned_pattern import PatternError, attached_pattern
    from elastic_tokens.nodes.extension import ElasticTokensExtension
    from elastic_tokens.nodes.load_merge_pattern import LoadMergePattern
    from elastic_tokens.nodes.load_patch_adapter import FOLDER

    folder = tmp_path / "models" / FOLDER
    folder.mkdir(parents=True)
    schema = LoadMergePattern.define_schema()  # registers the folder; then ours is the only one
    monkeypatch.setitem(folder_paths.folder_names_and_paths, FOLDER, ([str(folder)], {".safetensors"}))
    assert [i.id for i in schema.inputs] == ["model", "pattern_name"] and all(i.tooltip for i in schema.inputs)
    assert LoadMergePattern in asyncio.run(ElasticTokensExtension().get_node_list())
    name = "tiny_flux_pattern.safetensors"
    shutil.copy(flux_pattern[0], folder / name)
    out = LoadMergePattern.execute(tiny_flux, name).result[0]
    assert out is not tiny_flux and attached_pattern(out.model_options["transformer_options"]).name == name
    assert attached_pattern(tiny_flux.model_options.get("transformer_options")) is None
    with pytest.raises(PatternError, match="no pattern selected.*--mode pattern") as err:
        LoadMergePattern.execute(tiny_flux, "")
    assert str(folder) in str(err.value)


def test_bench_quality_measures_a_learned_pattern(flux_pattern, tiny_flux):
    """``merge=R:learned`` with ``--pattern-file``: the Token Merge node with the pattern attached
    (as Load Merge Pattern does), its token count the ratio's."""
    import argparse
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_quality

    (setting,) = bench_quality.parse_settings("merge=0.5:learned", 8, 0.4, False)
    assert setting.merge["order"] == "learned" and setting.schedule == "Token Merge ratio=0.5 learned/within_frames"
    provider = bench_quality.TinyFluxProvider(argparse.Namespace(size=128))
    provider._model = tiny_flux
    with pytest.raises(SystemExit, match="needs --pattern-file"):
        bench_quality.run_setting(provider, tiny_flux, setting, [5], argparse.Namespace(batch=1, warmup=0), None)
    args = argparse.Namespace(batch=2, warmup=0, pattern_file=str(flux_pattern[0]))
    res = bench_quality.run_setting(provider, tiny_flux, setting, [5, 6], args, None)
    (rep,) = res["reports"]
    assert not rep["fallbacks"] and res["images"].shape == (2, 128, 128, 3)
    assert rep["flops_used"] < 0.7 * rep["flops_native"]


def test_the_server_lists_the_loader_and_the_learned_order(comfy_server):
    """A real ComfyUI server loads the pack: Load Merge Pattern (a MODEL and a file of the
    elastic_tokens folder in, MODEL out) and Token Merge's order 'learned'."""
    info = comfy_server.object_info("ElasticTokensLoadMergePattern")["ElasticTokensLoadMergePattern"]
    assert info["display_name"] == "Load Merge Pattern" and info["output"] == ["MODEL"]
    assert set(info["input"]["required"]) == {"model", "pattern_name"}
    merge = comfy_server.object_info("ElasticTokensTokenMerge")["ElasticTokensTokenMerge"]
    order = merge["input"]["required"]["order"]
    options = order[1]["options"] if isinstance(order[0], str) else order[0]
    assert "learned" in options and "spread" in options


def test_resume_reuses_the_rollouts(cli, tmp_path, capsys):
    """``--ckpt`` keeps the rollouts' pair sums; ``--resume`` trains from them without sampling
    again and reaches the same pattern."""
    from elastic_tokens.ideas.merge.learned_pattern import load_pattern

    args = FLUX_ARGS + ["--ckpt", str(tmp_path / "ckpt")]
    first = cli.main(args + ["--out", str(tmp_path / "a.safetensors")])
    assert "rolled out" in capsys.readouterr().out
    second = cli.main(args + ["--resume", "--out", str(tmp_path / "b.safetensors")])
    log = capsys.readouterr().out
    assert "rollout statistics from" in log and "rolled out" not in log
    assert second["validation"] == first["validation"]
    assert torch.equal(load_pattern(tmp_path / "a.safetensors").embedding, load_pattern(tmp_path / "b.safetensors").embedding)


@pytest.mark.parametrize("proxy", ["image", "detail", "video"])
def test_the_committed_proxy_patterns_fit_the_committed_proxies(proxy, comfy, one_thread):
    """Each committed proxy pattern passes the loader's checks (family, geometry, base-weight
    fingerprint) against the proxy weights in the tree, so retrained proxy weights need a retrained
    pattern; and its grid is the provider's."""
    import importlib.util
    from pathlib import Path

    from elastic_tokens.families import binding_for
    from elastic_tokens.ideas.merge.learned_pattern import check_pattern, load_pattern

    root = Path(__file__).resolve().parents[1] / "benchmarks/proxy"
    spec = importlib.util.spec_from_file_location(f"{proxy}_provider_for_pattern_test", root / f"{proxy}_provider.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    provider = module.make_provider()
    model = provider.load()
    binding = binding_for(model)
    pattern = load_pattern(root / "adapters" / f"{proxy}_proxy_merge_pattern.safetensors")
    check_pattern(model, pattern, binding)
    assert pattern.spec.grid == binding.grid(tuple(provider.empty_latent(1).shape))


@pytest.mark.parametrize("proxy, family, grid", [("image", "flux", (1, 16, 16)), ("video", "wan", (9, 8, 8))])
def test_the_committed_proxy_pattern_beats_the_training_free_ones_on_held_out_rollouts(proxy, family, grid):
    """The image and video proxies' patterns (benchmarks/proxy/adapters/) are for their token grids,
    and their held-out merge cost (stored at training) is below spread's and border_first's at
    every ratio."""
    from pathlib import Path

    from elastic_tokens.ideas.merge.learned_pattern import load_pattern

    path = Path(__file__).resolve().parents[1] / f"benchmarks/proxy/adapters/{proxy}_proxy_merge_pattern.safetensors"
    assert path.stat().st_size < 300 * 1024
    pattern = load_pattern(path)
    assert pattern.spec.family == family and pattern.spec.grid == grid and pattern.spec.fingerprint
    costs = pattern.spec.training["validation"]["costs"]["denoised"]
    for ratio, row in costs.items():
        assert row["learned"] < min(row["spread"], row["border_first"]), ratio
    assert pattern.held_out_note(0.5) is None


def test_a_pattern_that_lost_on_held_out_rollouts_says_so_when_used(caplog):
    """A pattern whose training found a training-free order cheaper on held-out rollouts (as the
    detail proxy's did with few rollouts) logs which order did better when it is used."""
    import logging

    from elastic_tokens.ideas.merge.config import TokenMergeConfig
    from elastic_tokens.ideas.merge.learned_pattern import LearnedPattern, PatternSpec
    from elastic_tokens.ideas.merge.planner import TokenMergePlanner, TokenMergeRun

    costs = {"0.25": {"spread": 0.03, "border_first": 0.02, "learned": 0.01},
             "0.5": {"spread": 0.06, "border_first": 0.07, "learned": 0.08}}
    training = {"config": {"feature": "denoised"}, "validation": {"costs": {"denoised": costs}}}
    spec = PatternSpec("flux", (1, 8, 8), 2, 1, 16, 64, 8, training=training)
    pattern = LearnedPattern(spec, torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(8)), "p.safetensors")
    assert pattern.held_out_note(0.25) is None  # it won there
    note = pattern.held_out_note(0.45)
    assert note and "at ratio 0.5" in note and "'spread'" in note and "p.safetensors" in note
    assert LearnedPattern(PatternSpec("flux", (1, 8, 8), 2, 1, 16, 64, 8), pattern.embedding).held_out_note(0.5) is None
    run = TokenMergeRun(TokenMergePlanner(TokenMergeConfig(ratio=0.5, order="learned"), 1.0, 0.0), None, pattern)
    with caplog.at_level(logging.WARNING, logger="elastic_tokens"):
        merge = run.pattern((1, 8, 8))
    assert merge.count == 32 and "merged worse than 'spread'" in caplog.text


def test_rollouts_record_the_samplers_own_clean_estimates(tiny_flux):
    """The recorder's clean estimates (``x - sigma v`` of every call) are the sampler's own: pair
    sums from them equal pair sums of the denoised latents ComfyUI hands its step callback."""
    import comfy.sample

    from elastic_tokens.families import binding_for
    from elastic_tokens.kernels.patchify import patchify
    from elastic_tokens.training.pattern import PairStats, roll_out

    class Provider:
        steps, cfg, sampler, scheduler = 4, 1.0, "euler", "simple"

        def conditioning(self, seeds):
            return tiny_models.flux_conditioning(batch=len(seeds))

        def empty_latent(self, batch):
            return tiny_models.flux_latent(64, 64, batch)["samples"]

    binding = binding_for(tiny_flux)
    cells = mc.block_cells((1, 4, 4), (1, 4, 4))
    recorded = PairStats(cells)
    roll_out(Provider(), tiny_flux, binding, [11], recorded, 1, log=lambda m: None)
    assert recorded.calls == 4
    expected = PairStats(cells)
    empty = Provider().empty_latent(1)
    pos, neg = Provider().conditioning([11])

    def callback(step, x0, x, total):
        expected.add("denoised", patchify(x0.float(), 2)[0])
        expected.calls += 1
    comfy.sample.sample(tiny_flux, comfy.sample.prepare_noise(empty, 11), 4, 1.0, "euler", "simple", pos, neg,
                        empty, seed=11, disable_pbar=True, callback=callback)
    assert expected.calls == 4
    assert torch.allclose(recorded.mean("denoised"), expected.mean("denoised"), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(recorded.mean("velocity"), recorded.mean("denoised"))


def test_bench_speed_times_a_learned_pattern(pack, tmp_path):
    """``merge=R:learned`` in bench/bench_speed.py: a learned pattern of random embeddings attached
    as Load Merge Pattern does (timing only), merged to the ratio's token count."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(repo / "bench" / "bench_speed.py"), "--tiny", "--models", "flux", "--steps", "3",
           "--repeats", "1", "--warmup", "0", "--cuda-graphs", "off", "--variants", "merge=0.5:learned",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r["variant"]: r for r in json.loads((tmp_path / "bench_speed.json").read_text())["results"]}
    row = rows["merge=0.5:learned"]
    assert row["status"] == "ok" and row["finite"] and row["config"]["order"] == "learned"
    assert row["last_report"]["report"]["step_merged"] == [32] * 3 and row["tokens"] == {"1": 32 + 512}
