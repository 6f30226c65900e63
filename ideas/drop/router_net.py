"""The learned router of the Elastic Token Router: a tiny network in DC-DiT's spirit (DESIGN.md §10).

Its inputs are what the planner already has at a step without another model pass (the sampler's
last two latents and their sigmas, as the ``ras`` scorer reads them), per image token:

* ``latent``: the token's patch of the current latent (``C * p^2 [* pt]`` values);
* ``velocity``: the token's patch of the last update divided by its sigma spacing (the velocity
  the last computed step used; Euler makes it exact);
* ``log_update``: log of the std of that velocity in the patch (what ``ras`` ranks by);
* ``log_context``: log of the context residual RMS on the clean-image estimate (what ``context``
  ranks by);
* ``log_sigma``: the step's noise level (the same for every token).

Network (fully convolutional over each frame's token grid, so any grid size and Flux (one frame)
or Wan (frames x rows x cols, 3x3 convolutions within a frame) alike): the standardised inputs go
through a 1x1 conv to ``width`` channels ``h``; a 3x3 *context predictor* (its centre tap held at
zero) predicts ``h`` of each token from its neighbours, ``r = h - prediction`` is the DC-DiT
context residual in feature space; ``[h, r]`` -> 3x3 conv -> GroupNorm -> SiLU -> 1x1 conv -> one
logit per token (bias initialised at -1.1, DC-DiT's router init: sigmoid = 0.25 kept).

The logit orders the tokens: higher = more important to compute. One ordering serves every
budget (elastic), the planner keeps the top share. Features of the learned router are computed
by :func:`router_features`, the same function at training (training/router.py) and sampling
(ideas/drop/planner.py), so the two can never read different inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels import token_scores as ks

FEATURES = ("latent", "velocity", "log_update", "log_context", "log_sigma")
LOGIT_BIAS_INIT = -1.1
_EPS = 1e-6


def token_grid(latent_shape, patch: int, temporal_patch: int = 1) -> tuple[int, int, int]:
    """``(frames, rows, cols)`` of tokens of a latent shape (sizes that do not divide are padded up)."""
    h, w = latent_shape[-2], latent_shape[-1]
    frames = -(-latent_shape[2] // temporal_patch) if len(latent_shape) == 5 else 1
    return frames, -(-h // patch), -(-w // patch)


def feature_count(latent_channels: int, patch: int, temporal_patch: int = 1) -> int:
    values = latent_channels * patch * patch * temporal_patch
    return 2 * values + 3


@torch.no_grad()
def router_features(z_prev: torch.Tensor, z_cur: torch.Tensor, sigma_prev: float, sigma: float,
                    patch: int, temporal_patch: int = 1) -> torch.Tensor:
    """Per-token router inputs ``(B, N, F)`` (float32, tokens in the model's order) from the last
    two sampler latents (``(B, C, H, W)`` or ``(B, C, T, H, W)``) and their sigmas."""
    z_prev, z_cur = z_prev.float(), z_cur.float()
    gap = float(sigma_prev) - float(sigma)
    gap = gap if abs(gap) > 1e-12 else 1e-12
    v = (z_prev - z_cur) / gap
    latent = ks.token_values(z_cur, patch, temporal_patch)
    velocity = ks.token_values(v, patch, temporal_patch)
    log_update = torch.log(velocity.std(dim=-1, unbiased=False) + _EPS)
    x0 = z_cur - float(sigma) * v
    log_context = torch.log(ks.context_scores(x0, patch, temporal_patch) + _EPS)
    log_sigma = torch.full_like(log_update, math.log(max(float(sigma), _EPS)))
    return torch.cat([latent, velocity, log_update[..., None], log_context[..., None], log_sigma[..., None]], dim=-1)


def _pad(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (1, 1, 1, 1), mode="replicate")


class RouterNet(nn.Module):
    """Token features ``(B, N, F)`` on a ``(frames, rows, cols)`` grid -> one logit per token ``(B, N)``."""

    def __init__(self, features: int, width: int = 16, groups: int = 4):
        super().__init__()
        self.features, self.width = features, width
        self.register_buffer("input_mean", torch.zeros(features))
        self.register_buffer("input_std", torch.ones(features))
        self.embed = nn.Conv2d(features, width, 1)
        self.context = nn.Conv2d(width, width, 3)             # replicate-padded; centre tap masked
        self.mix = nn.Conv2d(2 * width, width, 3)
        self.norm = nn.GroupNorm(groups, width)
        self.out = nn.Conv2d(width, 1, 1)
        mask = torch.ones(1, 1, 3, 3)
        mask[..., 1, 1] = 0.0
        self.register_buffer("context_mask", mask, persistent=False)
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.out.bias, LOGIT_BIAS_INIT)

    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.input_mean.copy_(mean)
        self.input_std.copy_(std.clamp_min(1e-4))

    def forward(self, feats: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        b, n, f = feats.shape
        t, h, w = grid
        if n != t * h * w or f != self.features:
            raise ValueError(f"router inputs {tuple(feats.shape)} do not fit a {t}x{h}x{w} grid with "
                             f"{self.features} features")
        x = (feats - self.input_mean) / self.input_std
        x = x.reshape(b * t, h, w, f).permute(0, 3, 1, 2)    # each frame is one 2-d image
        e = self.embed(x)
        pred = F.conv2d(_pad(e), self.context.weight * self.context_mask, self.context.bias)
        y = self.mix(_pad(torch.cat([e, e - pred], dim=1)))
        y = self.out(F.silu(self.norm(y)))
        return y.reshape(b, n)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
