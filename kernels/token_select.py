"""Gather / scatter a subset of tokens, and merge / unmerge tokens by a group pattern.

The token plan (runtime/token_plan.py) says which image tokens go through the transformer
blocks (an ordered subset: token dropping) and how they are grouped (a merge pattern). These
are the tensor operations behind it, on any ``(..., N, ...)`` layout with the tokens on ``dim``.
Positions travel with their tokens through the same calls.

Merging uses an assignment vector ``groups`` (token ``i`` belongs to group ``groups[i]`` in
``0..K-1``): a group's token is the mean of its members, and unmerging copies it back to every
member. Both run as ``index_add`` / ``index_select``: no dense ``N x K`` matrix.
"""

from __future__ import annotations

import torch


def _long(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return index.to(device=like.device, dtype=torch.long)


def gather(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Tokens ``index`` (1-d, in that order) of ``x`` along ``dim``."""
    return x.index_select(dim, _long(index, x))


def scatter(full: torch.Tensor, index: torch.Tensor, part: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """A copy of ``full`` whose tokens ``index`` along ``dim`` are replaced by ``part``'s, in order."""
    return full.index_copy(dim, _long(index, full), part.to(full.dtype))


def with_extra(index: torch.Tensor, start: int, stop: int, extra_stop: int) -> torch.Tensor:
    """Stream positions of ``index`` (grid tokens counted from ``start``), with everything else
    of the stream (``[0, start)`` and ``[stop, extra_stop)``: text, reference tokens) kept."""
    index = index.to(torch.long)
    parts = [torch.arange(0, start, device=index.device), index + start,
             torch.arange(stop, extra_stop, device=index.device)]
    return torch.cat([p for p in parts if p.numel()])


def group_sizes(groups: torch.Tensor, count: int) -> torch.Tensor:
    """Members per group (``count`` groups; every group must have at least one)."""
    return torch.bincount(groups.to(torch.long), minlength=count)


def merge(x: torch.Tensor, groups: torch.Tensor, count: int, dim: int = 1) -> torch.Tensor:
    """Group means: ``(..., N, ...) -> (..., count, ...)`` along ``dim``."""
    groups = groups.to(device=x.device, dtype=torch.long)
    shape = list(x.shape)
    shape[dim] = count
    sums = torch.zeros(shape, device=x.device, dtype=torch.float32).index_add_(dim, groups, x.float())
    sizes = group_sizes(groups, count).to(torch.float32)
    view = [1] * x.ndim
    view[dim] = count
    return (sums / sizes.view(view)).to(x.dtype)


def unmerge(merged: torch.Tensor, groups: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Every token gets its group's value: ``(..., K, ...) -> (..., N, ...)`` along ``dim``."""
    return merged.index_select(dim, groups.to(device=merged.device, dtype=torch.long))
