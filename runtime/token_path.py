"""Run a subset of the image tokens through the blocks, and put the full grid back after them.

Installed for one model call as chained block hooks (runtime/block_hooks.py), on every block:

* first block, before: the image stream (its grid tokens, whatever text or reference tokens sit
  around them are always kept) is gathered to the plan's ``keep`` tokens, in that order (one
  selection for the whole batch, or one per sample: kernels/token_select.py), and the full
  stream is kept to fill back what was skipped;
* every block, before: the positions (``pe``) are gathered the same way, once per call (the
  model hands every block the full ``pe`` it computed), and so is a per-token ``vec`` (Wan 2.2's
  per-token timesteps);
* last block, after: the computed tokens are scattered back into the full grid; a skipped token
  gets its hidden state from before the blocks (it skipped them, residual stream unchanged), or
  what the plan's ``fill`` gives it (runtime/token_plan.py, TokenFill: e.g. a cached output).

Where a call's stream does not look as the family binding says (an unknown extra token block, a
``pe`` of another length), the hooks stay out of the way and the call runs dense, counted as a
fallback. Keeping every token in order computes exactly what the plain model computes.
"""

from __future__ import annotations

import torch

from ..families import FamilyBinding
from ..kernels.token_select import gather, rows_for, scatter, with_extra
from .block_hooks import stream_patches


def stream_layout_problem(binding: FamilyBinding, img, pe, start: int, text: int, tokens: int,
                          rotations: bool = False) -> str | None:
    """Why the first block's stream cannot be reshaped (None when it can): ``img`` must hold
    ``tokens`` grid tokens from ``start`` on, and ``pe`` (if any) one position per stream token
    (``rotations``: as 2x2 rotation matrices, which a merge averages)."""
    if img.ndim != 3 or img.shape[1] < start + tokens:
        return "token layout"
    if isinstance(pe, torch.Tensor):
        axis = binding.pe_token_axis
        expected = img.shape[1] - start + binding.pe_image_start(text)
        if pe.ndim <= axis + (2 if rotations else 0) or pe.shape[axis] != expected:
            return "position layout"
        if rotations and pe.shape[-2:] != (2, 2):
            return "position layout"
    elif pe is not None:
        return "position layout"
    return None


class TokenPath:
    def __init__(self, binding: FamilyBinding, keep: torch.Tensor, grid_tokens: int, on_fallback=None, fill=None):
        self.binding = binding
        self.fill = fill           # (grid, keep) -> grid: fills the skipped tokens (a plan's TokenFill)
        self.keep = keep
        self.grid_tokens = grid_tokens
        self.on_fallback = on_fallback or (lambda reason: None)
        self.active = False
        self.done = False
        self._full = None          # the first block's full image stream
        self._start = 0            # index of the first grid token in the first block's stream
        self._pe_in = self._pe_out = None

    # -- hooks ---------------------------------------------------------------------------
    def block_patches(self) -> dict:
        b = self.binding
        return stream_patches(b.block_keys, b.first_block, b.last_block, self._first, self._before, self._last)

    def _text_tokens(self, args: dict) -> int:
        txt = args.get("txt")
        return txt.shape[1] if isinstance(txt, torch.Tensor) and txt.ndim == 3 else 0

    def _first(self, args: dict) -> dict:
        if self.done:  # the model ran its first block twice in one call: not a layout we know
            self.active = False
            return args
        self.done = True
        b = self.binding
        img = args["img"]
        text = self._text_tokens(args)
        start = b.image_start(b.first_block, text)
        reason = self._layout_problem(img, args.get("pe"), start, text)
        if reason is not None:
            self.on_fallback(reason)
            return args
        keep = rows_for(self.keep, img.shape[0])
        if keep is None:  # a per-sample selection for a batch that is not made of its samples
            self.on_fallback("batch layout")
            return args
        self.active = True
        self._full, self._start, self._text = img, start, text
        self.keep = keep.to(img.device, torch.long)  # once per call, for every block
        index = with_extra(self.keep, start, start + self.grid_tokens, img.shape[1])
        self._index = index
        return self._before({**args, "img": gather(img, index, 1)})

    def _layout_problem(self, img, pe, start: int, text: int) -> str | None:
        return stream_layout_problem(self.binding, img, pe, start, text, self.grid_tokens)

    def _before(self, args: dict) -> dict:
        if not self.active:
            return args
        out = dict(args)
        pe = args.get("pe")
        if isinstance(pe, torch.Tensor):
            if pe is not self._pe_in:
                b = self.binding
                pe_start = b.pe_image_start(self._text)
                index = with_extra(self.keep.to(pe.device), pe_start, pe_start + self.grid_tokens,
                                   pe.shape[b.pe_token_axis])
                self._pe_in, self._pe_out = pe, gather(pe, index, b.pe_token_axis)
            out["pe"] = self._pe_out
        vec = args.get("vec")
        if isinstance(vec, torch.Tensor) and vec.ndim >= 3 and vec.shape[1] == self._full.shape[1]:
            out["vec"] = gather(vec, self._index, 1)  # per-token modulation (Wan 2.2 TI2V)
        return out

    def _last(self, out: dict) -> dict:
        if not self.active:
            return out
        self.active = False
        b = self.binding
        img = out["img"]
        start = b.image_start(b.last_block, self._text)
        kept = self.keep.shape[-1]
        grid = self._full[:, self._start:self._start + self.grid_tokens].to(img.dtype)
        grid = scatter(grid, self.keep, img[:, start:start + kept], 1)
        restored = torch.cat([img[:, :start], grid, img[:, start + kept:]], dim=1)
        if self.fill is not None:
            stop = start + self.grid_tokens
            filled = self.fill(restored[:, start:stop], self.keep)
            restored = torch.cat([restored[:, :start], filled.to(restored.dtype), restored[:, stop:]], dim=1)
        return {**out, "img": restored}
