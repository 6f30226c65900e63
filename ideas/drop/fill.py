"""Filling back the image tokens a routed step skipped (after the last block, before de-embed).

Two ways, both a :class:`~elastic_tokens.runtime.token_plan.TokenFill` of the step's plan:

* :class:`CacheFill` (RAS): a skipped token gets its own output (last block's hidden state) from
  the last step that computed it. Kept per batch chunk of the call, keyed by the conditioning's
  uuid in ``transformer_options["uuids"]`` (so the cond and uncond CFG branches, or several
  conds, each have their own cache whether ComfyUI batches them into one call or not). A dense
  step (every token computed) renews the whole cache.
* :class:`NearestFill` (DC-DiT's de-chunk, its last stage): a skipped token copies the output of
  the nearest computed token of the same step (kernels/token_scores.nearest_source).
"""

from __future__ import annotations

import torch

from ...kernels.token_select import gather, rows_for, scatter


def chunk_keys(options: dict, batch: int) -> list:
    """One key per batch chunk of a call: the conditioning uuids ComfyUI put in the options
    (else cond_or_uncond, else one chunk)."""
    keys = list(options.get("uuids") or options.get("cond_or_uncond") or [])
    if not keys or batch % len(keys):
        return [("batch", batch)]
    return keys


class FillState:
    """One sampling run's caches (per chunk key) and counters."""

    def __init__(self):
        self.cache: dict = {}
        self.missing = 0      # routed calls of a branch with no usable cache (filled from its input)

    def clear(self):
        self.cache.clear()


class CacheFill:
    def __init__(self, state: FillState, dense: bool):
        self.state = state
        self.dense = dense    # every token was computed: store, fill nothing

    def __call__(self, grid: torch.Tensor, keep: torch.Tensor, options: dict) -> torch.Tensor:
        keys = chunk_keys(options, grid.shape[0])
        per = grid.shape[0] // len(keys)
        parts = []
        for i, key in enumerate(keys):
            part = grid[i * per:(i + 1) * per]
            rows = keep if keep.ndim == 1 else keep[i * per:(i + 1) * per]
            cached = self.state.cache.get(key)
            if self.dense or cached is None or cached.shape != part.shape or cached.device != part.device:
                if not self.dense:
                    self.state.missing += 1
                new = part.contiguous()
            else:
                new = scatter(cached.to(part.dtype), rows, gather(part, rows, 1), 1)
            self.state.cache[key] = new
            parts.append(new)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


class NearestFill:
    def __init__(self, source: torch.Tensor):
        self.source = source  # (grid tokens,) or (samples, grid tokens) long: the token each copies

    def __call__(self, grid: torch.Tensor, keep: torch.Tensor, options: dict) -> torch.Tensor:
        if self.source.device != grid.device:
            self.source = self.source.to(grid.device)
        return gather(grid, rows_for(self.source, grid.shape[0]), 1)
