"""DDiT's patch-size criterion: how much fine spatial detail the latent trajectory is changing.

DDiT (arXiv 2602.16968) looks at the third-order finite difference of the latent trajectory,
``d3 = dz[t-1] - 2 dz[t] + dz[t+1]`` with ``dz[t] = z[t] - z[t+1]``. For each candidate coarse
patch it splits ``d3`` into blocks of that size, takes the std inside every block and the
rho-th percentile over blocks; the largest patch whose value stays under tau wins.

Raw ``d3`` scales with the latent's scale and with the step spacing, so one tau would not
carry across models or step counts. We normalise twice: first differences are divided by
their sigma spacing (``dz / dsigma`` is the velocity, so unequal steps are weighed fairly),
and the block stds are divided by the RMS of the whole ``d3`` field (so neither the latent's
scale nor the step size moves the score). The score is then the share of the
trajectory's curvature that varies *inside* a block: ~0 for changes smooth at that scale
(a coarse patch loses nothing), ~1 for white-noise-like detail.
"""

from __future__ import annotations

from typing import Sequence

import torch


def third_difference(latents: Sequence[torch.Tensor], sigmas: Sequence[float] | None = None) -> torch.Tensor:
    """Third-order difference of four consecutive latents ``z[t-3..t]`` (oldest first).

    With ``sigmas`` (the four noise levels), first differences are divided by their spacing,
    so a trajectory sampled with more, smaller steps gives the same value.
    """
    if len(latents) != 4:
        raise ValueError(f"the third difference needs 4 consecutive latents, got {len(latents)}")
    z = [t.float() for t in latents]
    dz = [z[i] - z[i + 1] for i in range(3)]
    if sigmas is not None:
        if len(sigmas) != 4:
            raise ValueError("need one sigma per latent")
        gaps = [float(sigmas[i]) - float(sigmas[i + 1]) for i in range(3)]
        if any(abs(g) < 1e-12 for g in gaps):
            raise ValueError(f"sigmas must be distinct, got {list(sigmas)}")
        dz = [d / g for d, g in zip(dz, gaps)]
    return dz[0] - 2 * dz[1] + dz[2]


def block_fits(shape: Sequence[int], block: int) -> bool:
    """Whether at least one whole ``block x block`` cell fits the last two (spatial) sizes of ``shape``."""
    return len(shape) >= 2 and shape[-2] >= block and shape[-1] >= block


def block_std(field: torch.Tensor, block: int) -> torch.Tensor:
    """Std inside each ``block x block`` spatial cell, RMS over channels.

    ``field`` is (B,C,H,W) or (B,C,T,H,W); video frames are treated separately. Returns one
    value per cell, flattened. Spatial sizes that do not divide are cropped to whole cells.
    """
    if field.ndim == 5:
        b, c, t, h, w = field.shape
        field = field.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    if field.ndim != 4:
        raise ValueError(f"expected a 4-d or 5-d field, got shape {tuple(field.shape)}")
    b, c, h, w = field.shape
    hb, wb = h // block, w // block
    if hb == 0 or wb == 0:
        raise ValueError(f"a {block}x{block} block does not fit a {h}x{w} latent")
    cells = field[..., : hb * block, : wb * block].reshape(b, c, hb, block, wb, block)
    var = cells.var(dim=(3, 5), unbiased=False)  # (b, c, hb, wb)
    return var.mean(dim=1).sqrt().flatten()


def detail_score(d3: torch.Tensor, block: int, rho: float) -> float:
    """rho-th percentile (0..1) over blocks of the block std, normalised by the RMS of ``d3``."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho is a fraction in [0, 1], got {rho}")
    rms = d3.float().pow(2).mean().sqrt()
    if not torch.isfinite(rms) or rms <= 0:
        return 0.0 if rms == 0 else float("inf")
    stds = block_std(d3.float(), block) / rms
    return float(torch.quantile(stds, rho))


def choose_factor(d3: torch.Tensor, native_patch: int, factors: Sequence[int], tau: float, rho: float) -> tuple[int, dict[int, float]]:
    """Pick the largest coarsening factor whose detail score is below ``tau`` (else 1).

    ``factors`` are candidate multiples of the native patch (e.g. (2, 4)); block size for factor
    ``k`` is ``k * native_patch`` latent cells. A factor whose block does not fit the latent (a
    latent smaller than that block in height or width) has no score and is not chosen. Returns the
    factor and every score computed.
    """
    scores: dict[int, float] = {}
    chosen = 1
    for k in sorted(factors):
        if k <= 1 or not block_fits(d3.shape, k * native_patch):
            continue
        score = detail_score(d3, k * native_patch, rho)
        scores[k] = score
        if score < tau:
            chosen = k
    return chosen, scores
