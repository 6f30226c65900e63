"""Patchify / unpatchify at any patch size, for images (B,C,H,W) and videos (B,C,T,H,W).

A DiT sees a latent as a sequence of patches. Dynamic patch scheduling changes the patch
size from step to step, so the token layout must be computable for any spatial patch size
(and, for video, any temporal patch size). The layout matches ComfyUI's own: Flux uses
``b c (h ph) (w pw) -> b (h w) (c ph pw)`` and Wan flattens (t, h, w) grids the same way.
"""

from __future__ import annotations

from typing import Sequence

import torch
from einops import rearrange


def _as_patch(patch: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    if isinstance(patch, int):
        patch = (patch,) * ndim
    patch = tuple(int(p) for p in patch)
    if len(patch) != ndim or any(p < 1 for p in patch):
        raise ValueError(f"patch size {patch} does not fit a {ndim}-d grid")
    return patch


def patchify(x: torch.Tensor, patch: int | Sequence[int]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Split ``x`` into non-overlapping patches; returns (tokens, grid).

    Images: ``(B,C,H,W) -> (B, H/ph*W/pw, C*ph*pw)``. Videos: ``(B,C,T,H,W) -> (B, T/pt*H/ph*W/pw,
    C*pt*ph*pw)``. Sizes must be divisible by the patch (pad first, see :func:`pad_to_multiple`).
    """
    if x.ndim == 4:
        ph, pw = _as_patch(patch, 2)
        b, c, h, w = x.shape
        if h % ph or w % pw:
            raise ValueError(f"latent {h}x{w} is not divisible by patch {ph}x{pw}")
        tokens = rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=ph, pw=pw)
        return tokens, (h // ph, w // pw)
    if x.ndim == 5:
        pt, ph, pw = _as_patch(patch, 3)
        b, c, t, h, w = x.shape
        if t % pt or h % ph or w % pw:
            raise ValueError(f"latent {t}x{h}x{w} is not divisible by patch {pt}x{ph}x{pw}")
        tokens = rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)
        return tokens, (t // pt, h // ph, w // pw)
    raise ValueError(f"expected a 4-d image or 5-d video latent, got shape {tuple(x.shape)}")


def unpatchify(tokens: torch.Tensor, grid: Sequence[int], patch: int | Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    if len(grid) == 2:
        ph, pw = _as_patch(patch, 2)
        h, w = grid
        return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h, w=w, ph=ph, pw=pw)
    if len(grid) == 3:
        pt, ph, pw = _as_patch(patch, 3)
        t, h, w = grid
        return rearrange(tokens, "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=pt, ph=ph, pw=pw)
    raise ValueError(f"grid {tuple(grid)} must have 2 (image) or 3 (video) entries")


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad the two trailing (spatial) dims up to a multiple, replicating the border.

    Returns the padded tensor and the original (H, W) so the caller can crop back.
    """
    h, w = x.shape[-2:]
    pad_h = (-h) % multiple
    pad_w = (-w) % multiple
    if pad_h == 0 and pad_w == 0:
        return x, (h, w)
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, h, w)
    flat = torch.nn.functional.pad(flat, (0, pad_w, 0, pad_h), mode="replicate")
    return flat.reshape(*lead, h + pad_h, w + pad_w), (h, w)
