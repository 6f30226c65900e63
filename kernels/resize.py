"""Resizing patches and latents between patch sizes.

Two equivalent views of a coarse patch size ``k*p`` for a model trained at patch ``p``:

* new embed weights: FlexiViT's pseudo-inverse resize ``w' = pinv(B^T) w`` where ``B`` resizes
  a ``p x p`` patch to ``k*p x k*p`` (:func:`pi_resize_embed`);
* the native embed applied to a downsampled latent, ``<x, w'> = <pinv(B) x, w>``
  (:func:`downsample`). With ``B`` = nearest upsampling, ``pinv(B)`` is average pooling.

The second view needs no new layers: the model runs unchanged (its LoRA-patched weights
included) on a smaller latent. :func:`upsample` is the matching de-embed.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .patchify import patchify, unpatchify

DOWN_MODES = ("area", "pinv-bilinear")
UP_MODES = ("bilinear", "nearest")


@functools.lru_cache(maxsize=64)
def resize_matrix_1d(n_in: int, n_out: int, mode: str = "bilinear") -> torch.Tensor:
    """Matrix ``M`` (n_out, n_in) with ``M @ s == resize(s)`` for a 1-d signal ``s`` (float64)."""
    eye = torch.eye(n_in, dtype=torch.float64).unsqueeze(1)  # (n_in, 1, n_in): each row one impulse
    if mode == "bilinear":
        out = F.interpolate(eye, size=n_out, mode="linear", align_corners=False)
    elif mode in ("nearest", "area"):
        out = F.interpolate(eye, size=n_out, mode=mode)
    else:
        raise ValueError(f"unknown resize mode {mode!r}")
    return out.squeeze(1).T.contiguous()


def resize_matrix(in_hw: tuple[int, int], out_hw: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Separable 2-d resize as a matrix on row-major flattened patches: (Ho*Wo, Hi*Wi)."""
    mh = resize_matrix_1d(in_hw[0], out_hw[0], mode)
    mw = resize_matrix_1d(in_hw[1], out_hw[1], mode)
    return torch.kron(mh, mw)


def pi_resize_embed(weight: torch.Tensor, channels: int, old_patch: int, new_patch: int, mode: str = "bilinear") -> torch.Tensor:
    """Pseudo-inverse resize of a patch-embedding weight (D, C*p*p) to (D, C*q*q).

    Layout of the input features is ``(c ph pw)`` as in Flux/Wan patchify.
    """
    d = weight.shape[0]
    b = resize_matrix((old_patch, old_patch), (new_patch, new_patch), mode)  # (q*q, p*p)
    resize = torch.linalg.pinv(b.T)  # (q*q, p*p)
    w = weight.detach().to(torch.float64).reshape(d, channels, old_patch * old_patch)
    out = torch.einsum("dcp,qp->dcq", w, resize)
    return out.reshape(d, channels * new_patch * new_patch).to(weight.dtype)


@functools.lru_cache(maxsize=16)
def pinv_block_operator(patch: int, factor: int, mode: str = "bilinear") -> torch.Tensor:
    """``pinv(B)`` (p*p, (k*p)^2): the latent downsampling equivalent of a PI-resized embed."""
    big = patch * factor
    return torch.linalg.pinv(resize_matrix((patch, patch), (big, big), mode))


@functools.lru_cache(maxsize=16)
def _block_operator_on(patch: int, factor: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """:func:`pinv_block_operator` moved once to where the latents live (not on every step)."""
    return pinv_block_operator(patch, factor).to(device=device, dtype=dtype)


def _fold_video(x: torch.Tensor):
    """Treat a (B,C,T,H,W) video as a batch of (B*T, C, H, W) frames; returns an unfold fn."""
    if x.ndim == 4:
        return x, lambda y: y
    if x.ndim != 5:
        raise ValueError(f"expected a 4-d or 5-d latent, got shape {tuple(x.shape)}")
    b, c, t = x.shape[:3]
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, *x.shape[-2:])

    def unfold(y: torch.Tensor) -> torch.Tensor:
        return y.reshape(b, t, y.shape[1], *y.shape[-2:]).permute(0, 2, 1, 3, 4)

    return frames, unfold


def downsample(x: torch.Tensor, factor: int, patch: int = 2, mode: str = "area") -> torch.Tensor:
    """Shrink the two spatial dims by ``factor`` as the coarse patch embed would see them.

    ``area`` averages ``factor x factor`` cells (= PI-resize with nearest ``B``); ``pinv-bilinear``
    applies ``pinv(B)`` of the bilinear patch resize inside each ``factor*patch`` block.
    Spatial sizes must be divisible by ``factor * patch``.
    """
    if factor == 1:
        return x
    frames, unfold = _fold_video(x)
    if mode == "area":
        out = F.avg_pool2d(frames, factor)
    elif mode == "pinv-bilinear":
        big = factor * patch
        tokens, grid = patchify(frames, big)
        b, n, _ = tokens.shape
        op = _block_operator_on(patch, factor, x.device, x.dtype)
        small = tokens.reshape(b, n, -1, big * big) @ op.T
        out = unpatchify(small.reshape(b, n, -1), grid, patch)
    else:
        raise ValueError(f"unknown downsample mode {mode!r}; choose from {DOWN_MODES}")
    return unfold(out)


def upsample(x: torch.Tensor, factor: int, mode: str = "bilinear") -> torch.Tensor:
    """Grow the two spatial dims by ``factor`` (the coarse de-embed)."""
    if factor == 1:
        return x
    frames, unfold = _fold_video(x)
    if mode == "bilinear":
        out = F.interpolate(frames, scale_factor=factor, mode="bilinear", align_corners=False)
    elif mode == "nearest":
        out = frames.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    else:
        raise ValueError(f"unknown upsample mode {mode!r}; choose from {UP_MODES}")
    return unfold(out)


def noise_gain(factor: int, patch: int = 2, mode: str = "area") -> float:
    """Std of white noise after :func:`downsample` (input std 1): 1/factor for ``area``."""
    if factor == 1:
        return 1.0
    if mode == "area":
        return 1.0 / factor
    op = pinv_block_operator(patch, factor)
    return float(op.pow(2).sum(dim=1).mean().sqrt())
