"""The trained image proxy as a bench_quality provider (benchmarks/proxy/image_provider.py), on CPU.

* the provider builds a ComfyUI ModelPatcher from image_proxy.safetensors (strict load, config from
  the file's metadata: 4 heads, not the 24 of ComfyUI's detection);
* two samples at 8 steps through ComfyUI's sampler (KSampler's path, the provider's conditioning)
  decode to finite 128x128 RGB images in [0, 1];
* ComfyUI's KSampler path matches the trainer's own Euler sampler (train_image_proxy.sample) on the
  same noise and classes once the output's process_latent_out is undone: measured max |diff| of
  the raw latent 5e-6 to 1.1e-5 at 8 steps (float32 rounding; 8 divides ComfyUI's 10000-entry
  sigma table, so the schedules agree to 6e-8); tolerance 1e-4. Without the inverse the difference
  is ~2 (the FLUX scale/shift), so the check has teeth;
* make_real returns class-balanced Fashion-MNIST TEST images (none equal to a training image),
  upsampled exactly as the trainer does.

Skipped only if benchmarks/proxy/image_proxy.safetensors (or its text file) is absent.
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
import image_provider as ip  # noqa: E402

WEIGHTS = ip.weights_path()
pytestmark = pytest.mark.skipif(
    not (WEIGHTS.is_file() and WEIGHTS.with_name(ip.TEXT_FILE).is_file()),
    reason=f"{WEIGHTS} or {ip.TEXT_FILE} absent (trained weights not merged yet: "
           "train_image_proxy.py --merge DIR)")
TOL_RAW = 1e-4  # measured 5e-6 .. 1.1e-5 (fp32 rounding)


@pytest.fixture(scope="module")
def provider(comfy):
    p = ip.make_provider()
    p.setup("cpu")
    p.load()
    return p


def test_loads_with_file_config(provider):
    flux = provider._model.model.diffusion_model
    assert flux.num_heads == provider.config["num_heads"] == 4
    assert flux.hidden_size == 256
    assert provider._model.model.model_config.unet_config["depth_single_blocks"] == 4
    assert next(flux.parameters()).dtype == torch.float32  # CPU default
    assert provider.class_tokens.shape == (11, 4, 256)
    assert provider.class_names[-1] == "<empty>"
    pos, neg = provider.conditioning([0, 13, 27])
    assert [provider.class_of(s) for s in (0, 13, 27)] == [0, 3, 7]
    assert pos[0][0].shape == (3, 4, 256) and pos[0][1]["pooled_output"].shape == (3, 256)
    assert pos[0][1]["guidance"] == 1.0
    assert torch.equal(neg[0][0][0], provider.class_tokens[ip.EMPTY])


def test_two_samples_are_images(provider):
    import comfy.sample
    import comfy.utils

    comfy.utils.set_progress_bar_enabled(False)
    seeds = [0, 1]
    lat = provider.empty_latent(2)
    assert lat.shape == (2, 16, 32, 32)
    noise = torch.cat([comfy.sample.prepare_noise(lat[:1], s) for s in seeds])
    pos, neg = provider.conditioning(seeds)
    with torch.inference_mode():
        out = comfy.sample.sample(provider._model, noise, 8, provider.cfg, provider.sampler, provider.scheduler,
                                  pos, neg, lat, disable_pbar=True, seed=0)
        img = provider.decode(out)
    assert img.shape == (2, 3, 128, 128)
    assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
    assert img.std() > 0.1  # an image, not a flat field
    assert (img[0] - img[1]).abs().mean() > 0.02  # different classes, different seeds


def test_ksampler_matches_trainer_sampler(provider):
    r = ip.compare_with_trainer(provider, [2, 9], steps=8, seed=3)
    assert r["max_abs_sigmas"] < 1e-6
    assert r["max_abs_raw"] < TOL_RAW, r["max_abs_raw"]
    assert r["max_abs_pixels"] < TOL_RAW
    assert r["max_abs_raw_without_inverse"] > 0.5  # the latent-format inverse is what makes them agree
    assert r["ref_img"].shape == (2, 1, 128, 128)


def test_make_real_is_held_out(provider):
    real = ip.make_real()
    try:
        real.load_split()
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST is not installed ({e}); bash scripts/proxy_data.sh installs it")
    imgs, labels = real.images(30, (128, 128), return_labels=True)
    assert imgs.shape == (30, 128, 128, 3) and imgs.dtype == np.uint8
    assert (imgs[..., 0] == imgs[..., 2]).all()  # gray as RGB
    assert labels.tolist() == [i % 10 for i in range(30)]  # the generated class of seed i
    t = ip.trainer()
    test_u8, test_labels = real.load_split()
    assert len(test_u8) == 10000
    idx = ip.balanced_order(test_labels, 30)
    ref = t.to_image(t.to_latent(torch.from_numpy(test_u8[idx].copy())))
    ref = ((ref[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    assert np.array_equal(imgs[..., 0], ref)
    train = t.read_idx(real.dir / "train-images-idx3-ubyte.gz")
    seen = {x.tobytes() for x in train}
    assert not any(test_u8[i].tobytes() in seen for i in idx)
    assert len(real.images(7)) == 7


def test_dynamic_criterion_reads_the_sampler_latent_not_the_bf16_cast(pack, provider):
    """On a GPU, ComfyUI casts the latent to the model's bf16 before the diffusion model runs. The
    criterion's third difference is small enough that bf16 rounding noise swamped it (every step
    scored ~0.8 "detailed" and tau = 0.5 never went coarse on a GPU, 0.1 on CPU). The schedule reads
    the sampler's own float32 latent instead: rounding the diffusion model's input (what the cast
    does) must leave the scores and decisions as they are."""
    import comfy.patcher_extension as pe
    import comfy.sample
    import comfy.utils
    from elastic_tokens import last_run_report
    from elastic_tokens.ideas.patch import apply_patch_schedule
    from elastic_tokens.ideas.patch.config import PatchScheduleConfig

    def bf16_cast(executor, x, *args, **kwargs):  # outermost: ours moves innermost at sampling time
        return executor(x.to(torch.bfloat16).to(x.dtype), *args, **kwargs)

    comfy.utils.set_progress_bar_enabled(False)
    seeds = [0, 1]
    lat = provider.empty_latent(2)
    noise = torch.cat([comfy.sample.prepare_noise(lat[:1], s) for s in seeds])
    pos, neg = provider.conditioning(seeds)
    plain = apply_patch_schedule(provider._model, PatchScheduleConfig(tau=0.5))
    cast = plain.clone()
    cast.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test.bf16_cast", bf16_cast)
    reports = []
    for model in (plain, cast):
        with torch.inference_mode():
            comfy.sample.sample(model, noise, 12, provider.cfg, provider.sampler, provider.scheduler,
                                pos, neg, lat, disable_pbar=True, seed=0)
        reports.append(last_run_report(model))
    full, rounded = reports
    # Steps 3..8 (after that, 4p steps amplify the rounded inputs and the trajectories drift apart).
    # Before the fix the rounded run scored ~0.8 on every step and stayed native.
    assert full.step_factors[3] > 1  # this proxy's trajectory is smooth at tau = 0.5
    assert rounded.step_factors[:9] == full.step_factors[:9]
    for a, b in zip(full.step_scores[3:9], rounded.step_scores[3:9]):
        assert a.keys() == b.keys() == {2, 4}
        assert all(abs(a[k] - b[k]) < 0.05 for k in a), (a, b)
