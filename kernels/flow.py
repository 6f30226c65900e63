"""Noise-level correction for a coarse step of a flow-matching model.

Rectified-flow latents are ``x = (1 - s) x0 + s * eps``. Downsampling by ``k`` keeps the
(smooth) signal but shrinks white noise by a gain ``g`` (``1/k`` for area pooling), so the
pooled latent is *less noisy* than its sigma says: ``(1 - s) x0' + s g eps'``. Dividing by
``(1 - s) + s g`` puts it back on the flow path at

    s' = s g / ((1 - s) + s g),

where the model is asked for its velocity. From that we form the coarse clean estimate
``x0' = x' - s' v'``, upsample it and return the full-size velocity ``(x - up(x0')) / s``:
the fine noise in ``x`` is kept exactly, only the denoised estimate comes from the coarse grid.
(docs/design_notes.md section 2 says why this matters.)
"""

from __future__ import annotations

import torch


def _per_sample(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (ndim - 1)))


def coarse_sigma(sigma: torch.Tensor, gain: float) -> torch.Tensor:
    """Noise level of a latent whose noise was scaled by ``gain`` (signal kept)."""
    sigma = sigma.float()
    return sigma * gain / ((1.0 - sigma) + sigma * gain)


def rescale_to_flow(x_small: torch.Tensor, sigma: torch.Tensor, gain: float, channels: int) -> torch.Tensor:
    """Divide the noisy channels of a downsampled latent by ``(1 - s) + s g``.

    Channels past ``channels`` (image conditioning concatenated by I2V/fill models) carry no
    noise and are left as they are.
    """
    scale = 1.0 / ((1.0 - sigma.float()) + sigma.float() * gain)
    scale = _per_sample(scale, x_small.ndim).to(x_small.dtype)
    if x_small.shape[1] == channels:
        return x_small * scale
    noisy = x_small[:, :channels] * scale
    return torch.cat([noisy, x_small[:, channels:]], dim=1)


def clean_estimate(x_small: torch.Tensor, v_small: torch.Tensor, sigma_small: torch.Tensor) -> torch.Tensor:
    """``x0' = x' - s' v'`` on the coarse grid (velocity parameterisation)."""
    c = v_small.shape[1]
    return x_small[:, :c] - _per_sample(sigma_small, v_small.ndim).to(v_small.dtype) * v_small


def full_velocity(x: torch.Tensor, x0_full: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Velocity at full size whose denoised estimate is ``x0_full``: ``(x - x0) / s``."""
    c = x0_full.shape[1]
    s = _per_sample(sigma, x.ndim).to(x0_full.dtype).clamp_min(1e-6)
    return (x[:, :c] - x0_full) / s
