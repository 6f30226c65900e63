"""Image-quality metrics for comparing an accelerated run against its baseline (numpy + Pillow only).

* :func:`psnr` -- peak signal-to-noise ratio in dB over all pixels (``inf`` for identical inputs).
* :func:`ssim` -- structural similarity (Wang et al. 2004) with an 11x11 Gaussian window
  (sigma 1.5), K1 = 0.01, K2 = 0.03, computed per channel on the "valid" part of the image (no
  padding) and averaged over channels (and frames, for a video). 1.0 for identical inputs.
* :func:`load_frames` -- an image file as a ``(frames, H, W, 3)`` float64 array in 0..255; an
  animated WEBP/GIF gives all its frames.

Arrays are ``(H, W)``, ``(H, W, C)`` or ``(frames, H, W, C)`` with values in ``0..data_range``.
For a video, SSIM is the mean over frames and PSNR uses the mean squared error of all frames.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def _as_frames(x) -> np.ndarray:
    """``(frames, H, W, C)`` float64 view of a 2-d, 3-d or 4-d array."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 2:
        a = a[None, :, :, None]
    elif a.ndim == 3:
        a = a[None]
    elif a.ndim != 4:
        raise ValueError(f"expected (H, W), (H, W, C) or (frames, H, W, C), got shape {a.shape}")
    return a


def _check_pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_frames(a), _as_frames(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return a, b


def psnr(a, b, data_range: float = 255.0) -> float:
    """PSNR in dB of ``b`` against ``a``: ``10 log10(data_range^2 / MSE)``; ``inf`` if equal."""
    a, b = _check_pair(a, b)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range ** 2 / mse)


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
    """Normalised 1-d Gaussian taps (the 2-d window is their outer product)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    w = np.exp(-(x ** 2) / (2.0 * sigma ** 2))
    return w / w.sum()


def _filter_valid(x, taps) -> np.ndarray:
    """Separable 'valid' filtering of ``x`` (..., H, W) along its last two axes (a numpy array or
    a torch tensor: only slicing and arithmetic with Python floats)."""
    taps = [float(t) for t in taps]
    k = len(taps)
    h, w = x.shape[-2:]
    rows = sum(taps[i] * x[..., i:h - k + 1 + i, :] for i in range(k))
    return sum(taps[i] * rows[..., :, i:w - k + 1 + i] for i in range(k))


def ssim_map(a, b, data_range: float = 255.0, window: int = WINDOW, sigma: float = SIGMA):
    """The SSIM map of two float64 ``(..., H, W)`` arrays, numpy or torch (quality_metrics runs it
    batched on a GPU), over the 'valid' part of the last two axes. Images smaller than the window
    use a window as large as their smaller side (odd)."""
    size = min(window, a.shape[-2], a.shape[-1])
    size -= 1 - size % 2  # keep it odd
    taps = gaussian_window(size, sigma)
    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    mu_a = _filter_valid(a, taps)
    mu_b = _filter_valid(b, taps)
    var_a = _filter_valid(a * a, taps) - mu_a ** 2
    var_b = _filter_valid(b * b, taps) - mu_b ** 2
    cov = _filter_valid(a * b, taps) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)
    return num / den


def ssim(a, b, data_range: float = 255.0, window: int = WINDOW, sigma: float = SIGMA) -> float:
    """Mean SSIM of ``b`` against ``a`` (see module docstring); 1.0 for identical inputs.

    Images smaller than the window use a window as large as their smaller side (odd).
    """
    a, b = _check_pair(a, b)
    # (frames, C, H, W): filter the two spatial axes of every frame and channel at once
    a = np.moveaxis(a, -1, 1)
    b = np.moveaxis(b, -1, 1)
    return float(np.mean(ssim_map(a, b, data_range, window, sigma)))


def load_frames(path) -> np.ndarray:
    """All frames of an image file (PNG, JPEG, animated WEBP/GIF...) as ``(frames, H, W, 3)`` 0..255."""
    from PIL import Image, ImageSequence

    with Image.open(Path(path)) as im:
        frames = [np.asarray(frame.convert("RGB"), dtype=np.float64) for frame in ImageSequence.Iterator(im)]
    if not frames:
        raise ValueError(f"no frames in {path}")
    return np.stack(frames)
