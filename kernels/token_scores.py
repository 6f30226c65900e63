"""Per-token importance scores for token dropping, and the selection of the tokens to compute.

Pure torch (no ComfyUI): the Elastic Token Router (ideas/drop/) scores every image token of a
step from what the sampler already has, then runs only the top share through the blocks.

Scorers, each giving one value per grid token of the native patch grid (``(B, N)``):

* :func:`update_scores` (RAS, microsoft/RAS): the std of the latent's last update inside the
  token's patch. Regions still moving a lot are recomputed; settled ones can reuse their output.
* :func:`context_scores` (DC-DiT's context-prediction residual with a fixed predictor): every
  latent cell is predicted by the mean of its 3x3 neighbours (replicate padding, per frame);
  the RMS of ``x - prediction`` over the token's cells and channels. Flat, predictable regions
  score low; edges and texture score high. Read on the current latent or an x0 estimate.
* :func:`change_scores`: the RMS of the change of the update between the last two steps (a
  second difference of the trajectory, divided by the sigma spacing): where the trajectory is
  still turning.

:func:`starved` multiplies scores by ``exp(rate * times skipped in a row)`` (RAS's starvation
term) so no region is skipped forever. :func:`rank` orders tokens by score, highest first, ties
broken by token index, so :func:`select` of a lower budget is always a subset of a higher budget's
selection from the same scores (the budget is *elastic*: one ordering serves every budget).
:func:`nearest_source` maps every grid token to the nearest computed one (DC-DiT's de-chunk
copies the nearest kept token's output).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .patchify import patchify


def _padded(x: torch.Tensor, patch: int, temporal_patch: int = 1) -> torch.Tensor:
    """``x`` (B,C,H,W) or (B,C,T,H,W) padded (replicating the border) to whole tokens, as the
    models pad before patchifying."""
    pad_h, pad_w = (-x.shape[-2]) % patch, (-x.shape[-1]) % patch
    pad_t = (-x.shape[2]) % temporal_patch if x.ndim == 5 else 0
    if not (pad_h or pad_w or pad_t):
        return x
    if x.ndim == 4:
        return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return F.pad(x, (0, pad_w, 0, pad_h, 0, pad_t), mode="replicate")


def token_values(x: torch.Tensor, patch: int, temporal_patch: int = 1) -> torch.Tensor:
    """The latent values each token sees: ``(B, N, C * patch^2 [* temporal_patch])``, tokens in
    the model's order (rows of the grid, frames outermost)."""
    x = _padded(x.float(), patch, temporal_patch)
    tokens, _ = patchify(x, patch if x.ndim == 4 else (temporal_patch, patch, patch))
    return tokens


def _rms(tokens: torch.Tensor) -> torch.Tensor:
    return tokens.square().mean(dim=-1).sqrt()


def update_scores(previous: torch.Tensor, current: torch.Tensor, patch: int, temporal_patch: int = 1) -> torch.Tensor:
    """RAS: std of ``current - previous`` inside each token's patch, ``(B, N)``."""
    tokens = token_values(current.float() - previous.float(), patch, temporal_patch)
    return tokens.std(dim=-1, unbiased=False)


def change_scores(latents, sigmas, patch: int, temporal_patch: int = 1) -> torch.Tensor:
    """RMS per token of the change of the update over three consecutive latents (oldest first),
    each update divided by its sigma spacing (a velocity), ``(B, N)``."""
    if len(latents) != 3 or len(sigmas) != 3:
        raise ValueError("change_scores needs three consecutive latents and their sigmas")
    z = [t.float() for t in latents]
    gaps = [float(sigmas[0]) - float(sigmas[1]), float(sigmas[1]) - float(sigmas[2])]
    gaps = [g if abs(g) > 1e-12 else 1e-12 for g in gaps]
    v_old, v_new = (z[0] - z[1]) / gaps[0], (z[1] - z[2]) / gaps[1]
    return _rms(token_values(v_new - v_old, patch, temporal_patch))


def context_residual(x: torch.Tensor) -> torch.Tensor:
    """``x - mean of its 8 spatial neighbours`` per latent cell (replicate padding; a video is
    read frame by frame): the error of DC-DiT's context prediction with a fixed predictor."""
    x = x.float()
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, *x.shape[-2:])
    ring = torch.ones(1, 1, 3, 3, dtype=flat.dtype, device=flat.device) / 8.0
    ring[0, 0, 1, 1] = 0.0
    pred = F.conv2d(F.pad(flat, (1, 1, 1, 1), mode="replicate"), ring)
    return (flat - pred).reshape(*lead, *x.shape[-2:])


def context_scores(x: torch.Tensor, patch: int, temporal_patch: int = 1) -> torch.Tensor:
    """DC-DiT's context residual, RMS over each token's cells and channels, ``(B, N)``."""
    return _rms(token_values(context_residual(x), patch, temporal_patch))


def x0_estimate(previous: torch.Tensor, current: torch.Tensor, sigma_prev: float, sigma: float) -> torch.Tensor:
    """The clean-image estimate a rectified-flow step implies: ``z - sigma * v`` with ``v`` the
    last update divided by its sigma spacing (exact for Euler, close for other samplers)."""
    gap = float(sigma_prev) - float(sigma)
    if abs(gap) < 1e-12:
        return current.float()
    v = (previous.float() - current.float()) / gap  # dz/dsigma (rectified flow: noise - x0)
    return current.float() - float(sigma) * v


def starved(scores: torch.Tensor, skipped: torch.Tensor, rate: float = 0.1) -> torch.Tensor:
    """RAS's starvation term: ``scores * exp(rate * skipped)`` (``skipped``: times each token was
    skipped in a row), so a token skipped long enough is computed again."""
    return scores * torch.exp(rate * skipped.to(scores.dtype))


def rank(scores: torch.Tensor) -> torch.Tensor:
    """Token indices of ``scores`` (one score per token on the last dim, 1-d or one row per
    sample), highest score first; equal scores by index (a NaN counts as the highest: such a
    token is computed rather than guessed)."""
    if scores.ndim not in (1, 2):
        raise ValueError(f"rank expects one score per token (1-d, or 2-d with a row per sample), "
                         f"got shape {tuple(scores.shape)}")
    s = torch.nan_to_num(scores.float(), nan=math.inf)
    return torch.sort(-s, dim=-1, stable=True).indices


def budget_tokens(budget: float, tokens: int) -> int:
    """Tokens computed at ``budget`` (share of ``tokens``, at least one)."""
    return min(tokens, max(1, int(round(budget * tokens))))


def select(scores: torch.Tensor, count: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """The ``count`` highest-scoring tokens, as ascending indices. Lower counts give subsets of
    higher counts' selections from the same scores (pass ``order = rank(scores)`` to reuse it)."""
    order = rank(scores) if order is None else order
    return torch.sort(order[..., :count], dim=-1).values


def nearest_source(keep: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """For every token of a ``(frames, rows, cols)`` grid, the index of the nearest kept token
    (itself where kept), ``(N,)`` long on the CPU; for a per-sample ``(B, K)`` keep, ``(B, N)``.

    Nearest in grid steps (4-neighbourhood within a frame, spreading one step per round, ties to
    the first neighbour in up/down/left/right order); a frame with no kept token copies from the
    nearest frame that has one.
    """
    if keep.ndim == 2:
        return torch.stack([nearest_source(row, grid) for row in keep])
    t, h, w = grid
    n = t * h * w
    keep = keep.detach().to("cpu", torch.long)
    if keep.numel() == 0:
        raise ValueError("nearest_source needs at least one kept token")
    labels = torch.full((n,), -1, dtype=torch.long)
    labels[keep] = keep
    labels = labels.view(t, h, w)

    def spread(lab: torch.Tensor, dims) -> torch.Tensor:
        while True:
            new = lab.clone()
            for dim in dims:
                for step in (1, -1):
                    src = torch.full_like(lab, -1)
                    size = lab.shape[dim]
                    if size < 2:
                        continue
                    if step == 1:   # take from the previous cell along dim
                        src.narrow(dim, 1, size - 1).copy_(lab.narrow(dim, 0, size - 1))
                    else:           # from the next cell
                        src.narrow(dim, 0, size - 1).copy_(lab.narrow(dim, 1, size - 1))
                    take = (new < 0) & (src >= 0)
                    new = torch.where(take, src, new)
            if torch.equal(new, lab):
                return lab
            lab = new

    labels = spread(labels, (1, 2))
    if bool((labels < 0).any()):
        labels = spread(labels, (0,))
    return labels.reshape(n)
