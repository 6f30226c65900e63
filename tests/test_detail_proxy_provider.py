"""The detail proxy as a bench_quality provider (benchmarks/proxy/detail_provider.py), on CPU.

On a tiny random-weight version of the architecture (always runs):
* the provider builds a ModelPatcher of ComfyUI's own Flux class from the config it is given, and
  two samples through ComfyUI's sampler (KSampler's path: comfy.sample.sample with the provider's
  conditioning and 16x64x64 empty latent) decode to finite 256x256 RGB images in [0, 1];
* that path matches the trainer's own Euler sampler (train_detail_proxy.sample) on the same noise
  and classes once process_latent_out is undone (tolerance 1e-4; without the inverse the
  difference is > 0.5, so the check has teeth);
* random weights are a pure function of the seed, and the final layer is random (the trainer's zero
  final layer would make every output the initial noise);
* make_real gives held-out reference scenes (seed 10^9 + i, class i % 10), exactly the scenes the
  generator renders, at the decoded size, in the grammar the weights were trained on;
  bench_quality's --model shorthands resolve.

With the trained weights (skipped, naming the command that makes them, while they are absent): the
trained file loads with its own config and its samples are images, not noise.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PROXY = REPO / "benchmarks" / "proxy"
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(PROXY))
import detail_provider as dp  # noqa: E402
import detail_scenes as ds  # noqa: E402

TOL_RAW = 1e-4
# the trained weights amplify fp32 rounding differences over the 8 steps far more than the tiny
# random model; still three orders of magnitude below a missing latent-format inverse (> 0.5)
TOL_TRAINED_RAW = 1e-3
TINY = ["--hidden", "32", "--heads", "2", "--depth", "1", "--single", "1", "--ctx-dim", "16"]


@pytest.fixture(scope="module")
def tiny(comfy):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t = dp.trainer()
    p = dp.make_random_provider(config=t.image_trainer().flux_config(t.parse_args(TINY)))
    p.setup("cpu")
    p.load()
    yield p
    torch.set_num_threads(threads)


def _sample(provider, seeds, steps):
    import comfy.sample
    import comfy.utils

    comfy.utils.set_progress_bar_enabled(False)
    lat = provider.empty_latent(len(seeds))
    assert lat.shape == (len(seeds), 16, 64, 64)
    noise = torch.cat([comfy.sample.prepare_noise(lat[:1], s) for s in seeds])
    pos, neg = provider.conditioning(seeds)
    with torch.inference_mode():
        out = comfy.sample.sample(provider._model, noise, steps, provider.cfg, provider.sampler, provider.scheduler,
                                  pos, neg, lat, disable_pbar=True, seed=0)
        return provider.decode(out), noise


def test_tiny_random_model_samples_through_ksampler(tiny):
    import comfy.ldm.flux.model

    flux = tiny._model.model.diffusion_model
    assert isinstance(flux, comfy.ldm.flux.model.Flux)
    assert flux.num_heads == 2 and flux.hidden_size == 32
    assert tiny.class_tokens.shape == (11, 4, 16) and tiny.class_names[-1] == "<empty>"
    img, noise = _sample(tiny, [0, 1], 4)
    assert img.shape == (2, 3, 256, 256)
    assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
    assert not torch.allclose(img[0], img[1])


def test_ksampler_matches_trainer_sampler(tiny):
    r = dp.compare_with_trainer(tiny, [2, 9], steps=8, seed=3)
    assert r["max_abs_raw"] < TOL_RAW, r["max_abs_raw"]
    assert r["max_abs_raw_without_inverse"] > 0.5  # the latent-format inverse is what makes them agree
    assert r["ref_img"].shape == (2, 1, 256, 256)


def test_random_weights_are_seeded_and_random_throughout(tiny):
    cfg = tiny.config
    a, ta = dp.make_random_provider(config=cfg, seed=0).random_state()
    b, tb = dp.make_random_provider(config=cfg, seed=0).random_state()
    c, _ = dp.make_random_provider(config=cfg, seed=1).random_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and torch.equal(ta, tb)
    assert not torch.equal(a["img_in.weight"], c["img_in.weight"])
    assert a["final_layer.linear.weight"].abs().sum() > 0
    assert any(k.endswith("query_norm.scale") for k in a)  # the files' (released) key names
    if not dp.weights_path().is_file():  # without the trained file: the trainer's default architecture
        assert dp.make_random_provider().config == dp.trainer().default_config()


def test_make_real_is_held_out_reference_scenes():
    real = dp.make_real()
    imgs, labels = real.images(6, (256, 256), return_labels=True)
    assert imgs.shape == (6, 256, 256, 3) and imgs.dtype == np.uint8
    assert (imgs[..., 0] == imgs[..., 2]).all()
    assert labels.tolist() == [i % 10 for i in range(6)]
    ref, _ = ds.render(ds.reference_seeds(6), grammar=dp.grammar_of())  # the grammar of the weights in use
    ref = ((ref[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    assert np.array_equal(imgs[..., 0], ref)
    assert ds.reference_seeds(6).min() >= ds.TRAIN_SEEDS
    assert real.images(2, (128, 128)).shape == (2, 128, 128, 3)


def test_make_real_draws_from_the_weights_grammar(tmp_path, monkeypatch):
    """Weights trained on the axis grammar (metadata ``grammar``) get axis reference scenes; a file
    without the key (the first proxy's) and no file at all get the free grammar."""
    from safetensors.torch import save_file

    for grammar in ("axis", None):
        f = tmp_path / f"{grammar}.safetensors"
        save_file({"x": torch.zeros(1)}, str(f), metadata={"grammar": grammar} if grammar else {"config": "{}"})
        monkeypatch.setenv("ELASTIC_TOKENS_DETAIL_WEIGHTS", str(f))
        imgs = dp.make_real().images(2, (256, 256))
        ref, _ = ds.render(ds.reference_seeds(2), grammar=grammar or "free")
        assert np.array_equal(imgs[..., 0], ((ref[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())
        assert dp.make_real().describe()["grammar"] == (grammar or "free")
    monkeypatch.setenv("ELASTIC_TOKENS_DETAIL_WEIGHTS", str(tmp_path / "absent.safetensors"))
    assert dp.grammar_of() == "free"
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad), metadata={"grammar": "diagonal"})
    with pytest.raises(ValueError, match="grammar 'diagonal'"):
        dp.grammar_of(bad)


def test_bench_quality_model_shorthands(comfy):
    import bench_quality

    args = bench_quality.parse_args(["--model", "detail-proxy-random"])
    p = bench_quality.make_model_provider(args.model, args)
    assert p.name == "detail-proxy-random" and p.default_real.endswith("detail_provider.py:make_real")
    for name, stem in (("image-proxy", "image_provider.py"), ("video-proxy", "video_provider.py"),
                       ("detail-proxy", "detail_provider.py")):
        path = REPO / bench_quality.PROXY_PROVIDERS[name].split(":")[0]
        assert path.name == stem and path.is_file()
    if (PROXY / "image_proxy.safetensors").is_file():
        assert bench_quality.make_model_provider("image-proxy", args).name == "image-proxy"
    with pytest.raises(SystemExit):
        bench_quality.make_model_provider("no-such-proxy", args)


WEIGHTS = dp.weights_path()
trained = pytest.mark.skipif(
    not (WEIGHTS.is_file() and WEIGHTS.with_name(dp.TEXT_FILE).is_file()),
    reason=f"{WEIGHTS} or {dp.TEXT_FILE} absent: {dp.HOW_TO_MAKE}")


@pytest.fixture(scope="module")
def provider(comfy):
    p = dp.make_provider()
    p.setup("cpu")
    p.load()
    return p


@trained
def test_trained_proxy_samples_are_images(provider):
    flux = provider._model.model.diffusion_model
    assert flux.num_heads == provider.config["num_heads"]
    assert provider._model.model.model_config.unet_config["depth_single_blocks"] == provider.config[
        "depth_single_blocks"]
    img, noise = _sample(provider, [0, 1], 8)
    assert img.shape == (2, 3, 256, 256)
    assert torch.isfinite(img).all() and img.std() > 0.1
    # not the noise it started from: a trained model's output is far smoother at the pixel scale
    nimg = ((dp.trainer().to_image(noise) + 1) / 2).clamp(0, 1)
    assert ds.high_freq_share(img[:, :1]) < 0.5 * ds.high_freq_share(nimg)


@trained
def test_trained_ksampler_matches_trainer_sampler(provider):
    r = dp.compare_with_trainer(provider, [4, 7], steps=8, seed=1)
    assert r["max_abs_raw"] < TOL_TRAINED_RAW and r["max_abs_raw_without_inverse"] > 0.5


@trained
def test_the_committed_proxy_is_the_axis_proxy_benchmarks_md_measures():
    """BENCHMARKS.md sections 3 and 8 describe and measure the committed file: trained on the
    ``axis`` scenes at the sampler's noise levels, so its held-out set is drawn in that grammar."""
    from safetensors import safe_open

    with safe_open(str(WEIGHTS), framework="pt") as f:
        meta = f.metadata()
    assert (meta["grammar"], float(meta["t_shift"]), int(meta["steps"])) == ("axis", 1.15, 3899)
    assert dp.grammar_of() == "axis" and dp.make_real().describe()["grammar"] == "axis"


@trained
def test_the_committed_detail_adapter_fits_the_committed_proxy(provider, pack):
    """The detail proxy's adapter (benchmarks/proxy/adapters/) passes the loader's checks, base-weight
    fingerprint included, against the weights in the tree: retrained weights need a retrained adapter."""
    from elastic_tokens.families import binding_for
    from elastic_tokens.ideas.patch.adapter_attach import check_adapter
    from elastic_tokens.ideas.patch.adapter_file import load_adapter

    path = Path(__file__).resolve().parents[1] / "benchmarks/proxy/adapters/detail_proxy_adapter_2x19.safetensors"
    model = provider._model
    check_adapter(model, load_adapter(path), binding_for(model), path.name)
