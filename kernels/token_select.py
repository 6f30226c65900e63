"""Gather / scatter a subset of tokens, and merge / unmerge tokens by a group pattern.

The token plan (runtime/token_plan.py) says which image tokens go through the transformer
blocks (an ordered subset: token dropping) and how they are grouped (a merge pattern). These
are the tensor operations behind it, on any ``(..., N, ...)`` layout with the tokens on ``dim``.
Positions travel with their tokens through the same calls.

An index is either 1-d (one selection for every sample of the batch) or 2-d ``(rows, K)``: a
selection per sample (row ``r`` of a batch uses ``index[r % rows]``, see :func:`rows_for`, as
ComfyUI stacks the cond and uncond chunks of the same samples into one batch).

Merging uses an assignment vector ``groups`` (token ``i`` belongs to group ``groups[i]`` in
``0..K-1``): a group's token is the mean of its members, and unmerging copies it back to every
member. Both run as ``index_add`` / ``index_select``: no dense ``N x K`` matrix.
"""

from __future__ import annotations

import torch


def _long(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return index.to(device=like.device, dtype=torch.long)


def rows_for(index: torch.Tensor, batch: int) -> torch.Tensor | None:
    """``index`` for a batch of ``batch`` rows: a 1-d index as is; a per-sample ``(rows, K)`` index
    repeated over the batch's chunks (None when ``batch`` is not a multiple of ``rows``)."""
    if index.ndim == 1 or index.shape[0] == batch:
        return index
    if batch % index.shape[0]:
        return None
    return index.repeat(batch // index.shape[0], 1)


def _row_index(index: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """A ``(B, K)`` index shaped for ``torch.gather`` / ``scatter`` along ``dim`` of ``like``."""
    view = [index.shape[0]] + [1] * (like.ndim - 1)
    view[dim] = index.shape[1]
    shape = list(like.shape)
    shape[0], shape[dim] = index.shape[0], index.shape[1]
    return _long(index, like).view(view).expand(shape)


def gather(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Tokens ``index`` (in that order) of ``x`` along ``dim``: 1-d for every sample alike, or
    ``(B, K)`` per sample (``x`` with batch 1, e.g. shared positions, is expanded to B)."""
    if index.ndim == 1:
        return x.index_select(dim, _long(index, x))
    if x.shape[0] != index.shape[0]:
        x = x.expand(index.shape[0], *x.shape[1:])
    return torch.gather(x, dim, _row_index(index, x, dim))


def scatter(full: torch.Tensor, index: torch.Tensor, part: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """A copy of ``full`` whose tokens ``index`` (1-d, or ``(B, K)`` per sample) along ``dim`` are
    replaced by ``part``'s, in order."""
    part = part.to(full.dtype)
    if index.ndim == 1:
        return full.index_copy(dim, _long(index, full), part)
    return full.scatter(dim, _row_index(index, part, dim), part)


def scatter_(full: torch.Tensor, index: torch.Tensor, part: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """:func:`scatter` in place (``full`` may be a view, e.g. the grid part of a longer buffer)."""
    part = part.to(full.dtype)
    if index.ndim == 1:
        return full.index_copy_(dim, _long(index, full), part)
    return full.scatter_(dim, _row_index(index, part, dim), part)


def with_extra(index: torch.Tensor, start: int, stop: int, extra_stop: int) -> torch.Tensor:
    """Stream positions of ``index`` (grid tokens counted from ``start``; 1-d or ``(B, K)``), with
    everything else of the stream (``[0, start)`` and ``[stop, extra_stop)``: text, reference
    tokens) kept."""
    index = index.to(torch.long)
    head = torch.arange(0, start, device=index.device)
    tail = torch.arange(stop, extra_stop, device=index.device)
    if index.ndim == 2:
        rows = index.shape[0]
        head, tail = head.expand(rows, -1), tail.expand(rows, -1)
    parts = [head, index + start, tail]
    return torch.cat([p for p in parts if p.shape[-1]], dim=-1)


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
