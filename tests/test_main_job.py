"""The main job (scripts/run_example.py) and its image metrics (scripts/image_metrics.py).

* Metric tests, plain numpy: PSNR/SSIM of identical images are inf / 1.0, known values, more noise
  scores lower, animated WEBP frames read back exactly.
* Helpers of run_example: the speed-setting schedule, the node's log line parser.
* ``server``: run_example's core (``run_case``) on the FLUX workflow at 64x64, 4 steps, against
  the session's real headless ComfyUI with the tiny models: baseline (node bypassed), accelerated
  (forced schedule) and dynamic runs succeed with finite numbers and the side-by-side PNG.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# Not the repo root on sys.path: the pack's own `nodes/` would shadow ComfyUI's `nodes` module.
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests" / "support"))
import image_metrics  # noqa: E402
import run_example  # noqa: E402
from image_metrics import psnr, ssim  # noqa: E402


def _image(seed: int = 0, size: int = 64) -> np.ndarray:
    """A smooth test picture with some edges (0..255, H x W x 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([128 + 100 * np.sin(6 * x + 2 * y), 128 + 100 * np.cos(5 * y),
                     255 * (x > 0.5) * (y > 0.3)], axis=-1)
    return np.clip(base + rng.normal(0, 3, base.shape), 0, 255)


def _noisy(img: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    return np.clip(img + np.random.default_rng(seed).normal(0, sigma, img.shape), 0, 255)


# =========================================================================== metrics


def test_identical_images_score_inf_and_one():
    img = _image()
    assert psnr(img, img.copy()) == math.inf
    assert ssim(img, img.copy()) == pytest.approx(1.0, abs=1e-12)
    video = np.stack([_image(s) for s in range(3)])
    assert psnr(video, video) == math.inf and ssim(video, video) == pytest.approx(1.0, abs=1e-12)


def test_psnr_known_value():
    img = _image()[:, :, 0] * 0 + 100.0  # flat grey, so +10 everywhere is an MSE of exactly 100
    assert psnr(img, img + 10) == pytest.approx(10 * math.log10(255 ** 2 / 100), abs=1e-9)
    assert psnr(img, img + 10, data_range=1.0) == pytest.approx(-20.0, abs=1e-9)


def test_more_noise_scores_lower():
    img = _image()
    mild, heavy = _noisy(img, 5), _noisy(img, 40)
    assert math.isfinite(psnr(img, mild)) and math.isfinite(psnr(img, heavy))
    assert psnr(img, heavy) < psnr(img, mild) - 10  # 8x the noise: about 18 dB lower
    assert ssim(img, heavy) < ssim(img, mild) < 1.0
    assert 0.0 < ssim(img, heavy) < 0.5 < ssim(img, mild)  # about 0.16 and 0.86


def test_ssim_sees_structure_that_psnr_misses():
    # same MSE for a constant shift and for noise: PSNR equal, SSIM much higher for the shift
    img = _image()[:, :, :1] * 0.5 + 64
    shifted = img + 8.0
    noisy = img + np.random.default_rng(3).choice([-8.0, 8.0], img.shape)
    assert psnr(img, shifted) == pytest.approx(psnr(img, noisy), abs=1e-9)
    assert ssim(img, shifted) > 0.95 > ssim(img, noisy)


def test_ssim_is_symmetric_and_checks_shapes():
    a, b = _image(0), _noisy(_image(0), 20)
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-12)
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(a, a[:32])
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, a[..., :1])
    assert ssim(a[:5, :5], b[:5, :5]) <= 1.0  # smaller than the 11x11 window still works


def test_animated_webp_frames_round_trip(tmp_path):
    from PIL import Image

    frames = [_image(s, 32).astype(np.uint8) for s in range(3)]
    path = tmp_path / "clip.webp"
    Image.fromarray(frames[0]).save(path, save_all=True, append_images=[Image.fromarray(f) for f in frames[1:]],
                                    lossless=True, duration=62)
    loaded = image_metrics.load_frames(path)
    assert loaded.shape == (3, 32, 32, 3)
    assert psnr(np.stack(frames).astype(np.float64), loaded) == math.inf
    png = tmp_path / "one.png"
    Image.fromarray(frames[1]).save(png)
    assert image_metrics.load_frames(png).shape == (1, 32, 32, 3)


# =========================================================================== run_example helpers


def test_speed_schedule():
    assert run_example.speed_schedule(28) == "1x6,2x22"   # the FLUX example: ~80% at 2p
    assert run_example.speed_schedule(30) == "1x6,2x24"
    assert run_example.speed_schedule(4) == "1x1,2x3"
    assert run_example.speed_schedule(2) == "1x1,2x1"     # always at least one native step


def test_parse_schedule_line():
    line = ("Dynamic Patch Schedule: 28/28 steps (6 at p, 22 at 2p, 0 at 4p); 40% of transformer FLOPs "
            "skipped, ~1.67x estimated; sampling took 1.83 s")
    assert run_example.parse_schedule_line(line) == {
        "steps": "28/28", "parts": "6 at p, 22 at 2p, 0 at 4p", "flops_skipped_pct": 40.0,
        "estimated_speedup": 1.67, "sampling_s": 1.83}
    assert run_example.parse_schedule_line("something else") == {}


# =========================================================================== against a real server


def test_main_job_core_on_flux(comfy_server, tmp_path):
    case = run_example.make_case("flux", width=64, height=64, steps=4)
    assert case.schedule == "1x1,2x3"
    result = run_example.run_case(comfy_server, case, dynamic=True, out_dir=tmp_path)

    assert [r.name for r in result.runs] == ["baseline", "accelerated", "dynamic"]
    base, acc, dyn = result.runs
    for r in result.runs:
        assert r.files and all(f.is_file() for f in r.files), r.name
        assert r.frames.shape == (1, 64, 64, 3), r.name
        for value in (r.prompt_s, r.sampler_s, r.speedup, r.prompt_speedup, r.ssim):
            assert value is not None and math.isfinite(value) and value > -1, (r.name, value)
        assert 0 < r.sampler_s <= r.prompt_s + 0.5, r.name
    # the baseline against itself, the accelerated run against the baseline
    assert base.psnr == math.inf and base.ssim == pytest.approx(1.0)
    assert base.log_line is None and base.speedup == pytest.approx(1.0)
    assert math.isfinite(acc.psnr) and acc.ssim < 1.0, "coarse steps should change the output"
    assert acc.log["parts"] == "1 at p, 3 at 2p, 0 at 4p" and acc.log["flops_skipped_pct"] > 0
    assert acc.log["sampling_s"] and math.isfinite(acc.log["sampling_s"])
    assert dyn.log and dyn.log["steps"] == "4/4"
    assert result.side_by_side == tmp_path / "flux_side_by_side.png" and result.side_by_side.is_file()

    from PIL import Image

    with Image.open(result.side_by_side) as im:
        assert im.width > 2 * 64 and im.height > 64
    text = run_example.report(result)
    assert "baseline" in text and "accelerated" in text and "1x1,2x3" in text
