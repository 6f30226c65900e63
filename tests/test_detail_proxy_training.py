"""The detail proxy's data (benchmarks/proxy/detail_scenes.py) and trainer (train_detail_proxy.py), on CPU.

Scenes:
* a scene is a pure function of its seed: the same seeds render bit-identically twice, and a
  scene does not depend on the batch it is rendered in (so the held-out reference set is the same
  whatever --batch the benchmark uses); the integer hash every parameter comes from equals a plain
  Python reference implementation (exact on every device);
* the held-out reference stream is disjoint from the training stream (seed ranges, and what the
  trainer's generator actually draws), and scene i of it has class i % 10 like the benchmark's seed i;
* the detail map means what it says: only 0/1, textured pixels vary strongly from pixel to pixel and
  flat ones do not (a detail map drawn at random would fail both), and a scene mix has flat and
  textured tokens in useful shares.

Trainer (tiny dims, a few seconds each, in-process):
* the loss on one fixed batch of scenes falls (model, forward, optimiser and data train together);
* 2 steps + checkpoint + resume for 2 more give bit-identical losses to 4 straight steps;
* the export reads back through ComfyUI's loader into ComfyUI's Flux class (strict), with the
  config, recipe and 16x64x64 latent in its metadata; samples.png has one 256x256 row per class.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

PROXY = Path(__file__).resolve().parents[1] / "benchmarks" / "proxy"
if str(PROXY) not in sys.path:
    sys.path.insert(0, str(PROXY))
import detail_scenes as ds  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core CPU
    yield
    torch.set_num_threads(threads)


def _py_hash32(x: int) -> int:
    m = 0xFFFFFFFF
    x &= m
    x = (((x >> 16) ^ x) * 0x45D9F3B) & m
    x = (((x >> 16) ^ x) * 0x45D9F3B) & m
    return (x >> 16) ^ x


def test_hash_is_exact_integer_arithmetic():
    xs = [0, 1, 2, 12345, 2**31 - 1, 2**32 + 7, ds.REF_SEED_BASE + 3, -5]
    got = ds.hash32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [_py_hash32(x) for x in xs]
    assert len(set(got)) == len(got)


def test_scenes_are_pure_functions_of_their_seed():
    seeds = [3, 17, ds.REF_SEED_BASE + 5]
    a_img, a_det = ds.render(seeds)
    b_img, b_det = ds.render(seeds)
    assert a_img.shape == (3, 1, 256, 256) and a_det.shape == (3, 1, 256, 256)
    assert torch.equal(a_img, b_img) and torch.equal(a_det, b_det)
    one_img, one_det = ds.render([17])  # same scene, other batch
    assert torch.allclose(one_img[0], a_img[1], atol=1e-5) and torch.equal(one_det[0], a_det[1])
    assert (a_img[0] - a_img[1]).abs().mean() > 0.05  # different seeds, different scenes
    assert a_img.min() >= -1 and a_img.max() <= 1


def test_reference_stream_is_held_out():
    ref = ds.reference_seeds(1000)
    assert ref.min() >= ds.TRAIN_SEEDS  # training seeds are [0, TRAIN_SEEDS)
    assert ds.class_of(ref).tolist() == [i % 10 for i in range(1000)]  # as the benchmark's seed i
    gen = torch.Generator().manual_seed(0)
    drawn = torch.cat([ds.train_seeds(gen, 4096) for _ in range(4)])
    assert drawn.min() >= 0 and drawn.max() < ds.TRAIN_SEEDS
    assert not set(drawn.tolist()) & set(ref.tolist())
    assert drawn.unique().numel() > 0.99 * drawn.numel()  # a stream, not a small pool
    # disjoint seeds give different scene parameters (the hash does not collapse the two ranges)
    ua, ub = ds.scene_uniforms(ref[:64]), ds.scene_uniforms(torch.arange(64))
    assert (ua[:, None, :8] - ub[None, :, :8]).abs().amax(-1).min() > 1e-3


def test_detail_map_marks_texture_and_only_texture():
    img, det = ds.render_many(torch.arange(12))
    assert set(det.unique().tolist()) <= {0.0, 1.0}
    g = (img[..., 1:, 1:] - img[..., :-1, 1:]).abs() + (img[..., 1:, 1:] - img[..., 1:, :-1]).abs()

    def changing(d):
        """Shares of pixels whose value changes by > 0.05 to a neighbour, inside the textured and
        inside the flat regions of map ``d`` (3x3 eroded, away from region borders)."""
        inner_tex = -torch.nn.functional.max_pool2d(-d, 3, 1, 1) > 0.5
        inner_flat = torch.nn.functional.max_pool2d(d, 3, 1, 1) < 0.5
        return (g[inner_tex] > 0.05).float().mean(), (g[inner_flat] > 0.05).float().mean()

    tex, flat = changing(det[..., 1:, 1:])
    assert tex > 0.6, tex      # textures change at the pixel scale (measured 0.80)
    assert flat < 0.05, flat   # gradients and flat shapes only at their outlines (measured 0.011)
    # another scene's detail map fails the same check (measured 0.41 / 0.30): the test has teeth
    tex_w, flat_w = changing(det[..., 1:, 1:].roll(1, dims=0))
    assert tex_w < 0.6 and flat_w > 0.05, (tex_w, flat_w)
    shares = ds.token_shares(det)
    assert 0.15 < shares["textured"] < 0.6 and 0.3 < shares["flat"] < 0.85, shares
    assert abs(sum(shares.values()) - 1) < 1e-6
    assert ds.token_detail(det).shape == (12, 32, 32)
    # textures put far more energy at periods below 8 px than a smooth image
    smooth = torch.nn.functional.interpolate(img, scale_factor=1 / 8, mode="area")
    smooth = torch.nn.functional.interpolate(smooth, size=(256, 256), mode="bilinear")
    assert ds.high_freq_share(img) > 0.05 > 5 * ds.high_freq_share(smooth)


def _texture_axis_aligned_share(img, det):
    """Of the eroded textured pixels where the image changes (by > 0.02 to the next pixel in x or
    in y), the share where it changes in one direction only: 1 for textures along the pixel grid."""
    inner = -torch.nn.functional.max_pool2d(-det, 5, 1, 2) > 0.5
    gx = (img[..., 1:-1, 2:] - img[..., 1:-1, 1:-1]).abs()
    gy = (img[..., 2:, 1:-1] - img[..., 1:-1, 1:-1]).abs()
    changing = (torch.maximum(gx, gy) > 0.02) & inner[..., 1:-1, 1:-1]
    return float((torch.minimum(gx, gy) < 0.02)[changing].float().mean())


def test_axis_grammar_snaps_every_angle_to_the_grid():
    """grammar='axis': the same seeds' scenes with shapes and textures along x / y (rectangles and
    ellipses), still a pure function of the seed, with detail and flat regions in the same shares;
    the free grammar's textures are not along the grid (the check has teeth)."""
    seeds = torch.arange(0, 40, 4)  # class 0, 4, 8, 2, 6, ...: stripes, mixed, grating, ...
    stripes = seeds[ds.class_of(seeds) % 5 == 0]
    a_img, a_det = ds.render(stripes, grammar="axis")
    f_img, f_det = ds.render(stripes)
    assert _texture_axis_aligned_share(a_img, a_det) > 0.97    # measured 0.994
    assert _texture_axis_aligned_share(f_img, f_det) < 0.6     # measured 0.438
    b_img, b_det = ds.render(stripes, grammar="axis")
    assert torch.equal(a_img, b_img) and torch.equal(a_det, b_det)
    def diagonal_steps(det):
        """Pixels where the detail map's outline steps in x and y at once, per outline pixel."""
        both = (det[..., 1:, 1:] != det[..., :-1, 1:]) & (det[..., 1:, 1:] != det[..., 1:, :-1])
        return float(both.float().sum() / (det[..., 1:, :] != det[..., :-1, :]).float().sum())

    img, det = ds.render(seeds, grammar="axis")
    assert diagonal_steps(det) < 0.15 < diagonal_steps(ds.render(seeds)[1])  # measured 0.10 (ellipses), 0.26
    shares = ds.token_shares(det)
    assert 0.15 < shares["textured"] < 0.6 and 0.3 < shares["flat"] < 0.85, shares
    with pytest.raises(ValueError, match="grammar 'diagonal'"):
        ds.render(seeds[:1], grammar="diagonal")


SCRIPT = PROXY / "train_detail_proxy.py"
TINY = ["--hidden", "32", "--heads", "2", "--depth", "1", "--single", "1", "--ctx-dim", "16",
        "--batch", "2", "--log-every", "1", "--sample-steps", "2", "--sample-cols", "1"]


@pytest.fixture(scope="module")
def trainer(comfy):
    spec = importlib.util.spec_from_file_location("_train_detail_proxy", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_overfits_fixed_batch(trainer):
    res = trainer.main(TINY + ["--fixed-batch", "--lr", "3e-3", "--warmup", "1", "--max-steps", "20"])
    losses = [r["loss"] for r in res["log"]]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < 0.75 * losses[0], losses  # measured 0.65


def test_resume_is_exact(trainer, tmp_path):
    full = trainer.main(TINY + ["--max-steps", "4"])
    trainer.main(TINY + ["--max-steps", "2", "--ckpt", str(tmp_path / "b.pt")])
    resumed = trainer.main(TINY + ["--max-steps", "4", "--resume", str(tmp_path / "b.pt")])
    assert [r["step"] for r in resumed["log"]] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed["log"]] == [r["loss"] for r in full["log"]]


def test_export_loads_into_comfy_flux(trainer, tmp_path):
    import comfy.ldm.flux.model
    import comfy.ops
    import comfy.utils
    from PIL import Image

    out = tmp_path / "export"
    res = trainer.main(TINY + ["--max-steps", "2", "--export", str(out)])
    tip = trainer.image_trainer()
    sd, meta = comfy.utils.load_torch_file(str(out / "detail_proxy.safetensors"), return_metadata=True)
    cfg = json.loads(meta["config"])
    assert cfg == res["config"] and json.loads(meta["elastic_tokens_test_config"]) == cfg
    assert meta["steps"] == "2" and "detail_scenes" in meta["data_recipe"] and meta["image_size"] == "256"
    assert meta["t_shift"] == "1.15" and meta["grammar"] == "axis"  # the defaults (the committed recipe)
    assert all(v.dtype == torch.float16 for v in sd.values())
    model = comfy.ldm.flux.model.Flux(dtype=torch.float32, device="cpu",
                                      operations=comfy.ops.disable_weight_init, **tip.comfy_flux_kwargs(cfg))
    model.load_state_dict(tip.model_names(sd, model), strict=True)
    x = torch.randn(1, 16, 64, 64)
    assert model.img_in(trainer.to_latent(trainer.to_image(x)).reshape(1, 16, 32, 2, 32, 2)
                        .permute(0, 2, 4, 1, 3, 5).reshape(1, 1024, 64)).shape == (1, 1024, 32)  # 1024 tokens
    text, tmeta = comfy.utils.load_torch_file(str(out / "detail_proxy_text.safetensors"), return_metadata=True)
    assert text["class_tokens"].shape == (11, 4, 16) and len(json.loads(tmeta["class_names"])) == 11
    assert Image.open(out / "samples.png").size == (256, 10 * 256)
    assert Image.open(out / "data.png").size == (8 * 256, 2 * 256)
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 2 and len(log["log"]) == 2
    assert Image.open(out / "denoise.png").size == (8 * 256, 4 * 256)  # the scenes, x0 at 3 noise levels
    assert sorted(log["denoise_mse"]) == ["0.5", "0.7", "0.9"] and all(v > 0 for v in log["denoise_mse"].values())
    assert sorted(p.name for p in out.iterdir()) == ["data.png", "denoise.png", "detail_proxy.safetensors",
                                                     "detail_proxy_text.safetensors", "samples.png",
                                                     "train_log.json"]  # the device returns <= 8 files


@pytest.mark.parametrize("grammar", ["axis", "free"])
def test_grammar_run_trains_and_says_so(trainer, tmp_path, grammar):
    """--grammar G: the batches, data.png and the probe's scenes come from grammar G, and the
    export's metadata says so (the benchmark draws its held-out set from it)."""
    import comfy.utils
    from PIL import Image

    out = tmp_path / grammar
    res = trainer.main(TINY + ["--max-steps", "1", "--grammar", grammar, "--export", str(out)])
    _, meta = comfy.utils.load_torch_file(str(out / "detail_proxy.safetensors"), return_metadata=True)
    assert meta["grammar"] == grammar and res["step"] == 1
    other = {"axis": "free", "free": "axis"}[grammar]
    for g in (grammar, other):
        ds.save_preview(torch.arange(8), tmp_path / f"{g}_data.png", grammar=g)
    got = np.asarray(Image.open(out / "data.png"))
    assert np.array_equal(got, np.asarray(Image.open(tmp_path / f"{grammar}_data.png")))
    assert not np.array_equal(got, np.asarray(Image.open(tmp_path / f"{other}_data.png")))


def test_training_noise_levels_follow_the_samplers_shift(trainer):
    """--t-shift moves training noise levels as ModelSamplingFlux moves the sampler's: the shifted
    draw of u is the sampler's sigma at u (flux_sigmas), 0 is the unshifted v1 draw, and the default
    puts most training steps at the high noise levels where a full-resolution scene's shapes form."""
    u = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    assert torch.equal(trainer.shifted_t(u, 0.0), u)
    sig = trainer.image_trainer().flux_sigmas(10).double()[:-1]  # t = 1.0, 0.9, ..., 0.1
    t = torch.linspace(1.0, 0.0, 11, dtype=torch.float64)[:-1]
    assert torch.allclose(trainer.shifted_t(t, 1.15), sig, atol=1e-6)
    assert trainer.parse_args([]).t_shift == 1.15
    draw = trainer.shifted_t(torch.sigmoid(torch.randn(20000, generator=torch.Generator().manual_seed(0),
                                                       dtype=torch.float64)), 1.15)
    assert 0.7 < draw.median() < 0.8 and (draw > 0.9).double().mean() > 0.12  # measured 0.76, 0.145; unshifted 0.5, 0.014
    assert torch.all(trainer.shifted_t(u, 1.15) > u)


def test_noised_batch_is_the_objectives_draws_in_order(trainer):
    """The one objective the trainer and grammar_probe.py share: labels dropped to the empty class
    with the given p, shifted t, then noise, all from one generator in that order (a resumed run and
    the probe depend on it); the loss's target is eps - x0."""
    x0, lab = torch.randn(64, 16, 4, 4), torch.arange(64) % 10
    g = torch.Generator().manual_seed(3)
    _, l0, t, eps = trainer.noised_batch(x0, lab, g, 0.0, 1.15)
    g2 = torch.Generator().manual_seed(3)
    drop = torch.rand(64, generator=g2) < 0.0
    assert not drop.any() and torch.equal(l0, lab)
    assert torch.equal(t, trainer.shifted_t(torch.sigmoid(torch.randn(64, generator=g2)), 1.15))
    assert torch.equal(eps, torch.randn(x0.shape, generator=g2))
    _, l1, _, _ = trainer.noised_batch(x0, lab, torch.Generator().manual_seed(3), 1.0, 1.15)
    assert (l1 == trainer.EMPTY).all()

    def oracle(model, xt, t, ctx, y, guidance):  # a "model" that predicts v from x_t exactly
        return (xt - x0) / t[:, None, None, None]
    tokens = torch.randn(11, 4, 8)
    assert trainer.flow_loss(oracle, None, tokens, x0, l0, t, eps).item() < 1e-8
    assert trainer.flow_loss(lambda *a, **k: torch.zeros_like(x0), None, tokens, x0, l0, t, eps) > 0.5


def test_default_model_is_the_designed_size(trainer):
    """2 double + 6 single blocks, hidden 96, 2 heads: ~1.6M parameters, ~3.1 MiB in fp16 (the tracked
    tree's budget: the two Fashion-MNIST proxies and their adapters already take 45 MiB of 60)."""
    cfg = trainer.default_config()
    assert (cfg["hidden_size"], cfg["num_heads"], cfg["depth"], cfg["depth_single_blocks"]) == (96, 2, 2, 6)
    assert cfg["axes_dim"] == [8, 20, 20]
    with torch.device("meta"):
        model = trainer.image_trainer().build_model(cfg, "meta")
    n = sum(p.numel() for p in model.parameters())
    assert 1.4e6 < n < 1.8e6 and 2 * n < 3.5 * 2**20


def test_init_warm_starts_from_an_export(trainer, tmp_path):
    """--init (a later device session, the checkpoint gone): the run starts from the exported
    weights and class tokens; at lr 0 its export equals the file it started from, and the step
    count carries on. Without --init the same run exports other weights (the test has teeth)."""
    from safetensors.torch import load_file

    first = tmp_path / "first"
    trainer.main(TINY + ["--max-steps", "2", "--export", str(first)])
    again = tmp_path / "again"
    trainer.main(TINY + ["--max-steps", "1", "--lr", "0", "--seed", "5", "--export", str(again),
                         "--init", str(first / "detail_proxy.safetensors")])
    fresh = tmp_path / "fresh"
    trainer.main(TINY + ["--max-steps", "1", "--lr", "0", "--seed", "5", "--export", str(fresh)])
    import comfy.utils
    a, meta = comfy.utils.load_torch_file(str(first / "detail_proxy.safetensors"), return_metadata=True)
    b, meta_b = comfy.utils.load_torch_file(str(again / "detail_proxy.safetensors"), return_metadata=True)
    c = load_file(str(fresh / "detail_proxy.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert meta["steps"] == "2" and meta_b["steps"] == "3"
    ta = load_file(str(first / "detail_proxy_text.safetensors"))["class_tokens"]
    tb = load_file(str(again / "detail_proxy_text.safetensors"))["class_tokens"]
    assert torch.equal(ta, tb)
    with pytest.raises(SystemExit, match="another architecture"):
        trainer.main(["--hidden", "48"] + TINY[2:] + ["--max-steps", "1", "--init", str(first / "detail_proxy.safetensors")])


def test_grammar_probe_trains_each_grammar_and_draws_its_denoising(comfy, tmp_path):
    """benchmarks/proxy/grammar_probe.py (tiny dims, 2 steps): one block per grammar, x0 MSE at
    each probe t, the command in its JSON; a crop that is not whole tokens is refused."""
    spec = importlib.util.spec_from_file_location("_grammar_probe", PROXY / "grammar_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    from PIL import Image

    rep = probe.main(["--steps", "2", "--pool", "4", "--probe-n", "2", "--crop", "16", "--threads", "1",
                      "--out", str(tmp_path), "--", *TINY[:10]])
    assert list(rep["grammars"]) == list(ds.GRAMMARS)
    for g, r in rep["grammars"].items():
        assert sorted(r["x0_mse"]) == ["0.3", "0.5", "0.7"] and r["log"][-1][0] == 2
        assert Image.open(tmp_path / f"{g}_x0.png").size == (2 * 16, 4 * 16)  # crops, then 3 noise levels
    assert Image.open(tmp_path / "grammar_probe.png").size == (32, 2 * 64 + 8)
    assert json.loads((tmp_path / "grammar_probe.json").read_text())["command"].startswith("grammar_probe.py")
    with pytest.raises(SystemExit):
        probe.parse_args(["--crop", "20", "--out", str(tmp_path)])

