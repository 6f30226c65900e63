"""Computed tokens also attend to the skipped ones (RAS): keys/values of skipped tokens from cache.

On a routed step only the kept image tokens run through the blocks, so by default they attend
only to each other (and the text). With ``attend_skipped`` the self-attention of every block also
gets the keys and values (after RoPE: each keeps its own position) of the skipped image tokens,
from the last step that computed them; dense steps fill this cache, routed steps renew the kept
tokens' entries. Kept per batch chunk (the conditioning's uuid, as the output cache) and block.

It goes in through ComfyUI's chainable attention slot, ``transformer_options[
"optimized_attention_override"]`` (``wrap_attn`` hands every attention call to it), on the call's
own copy of the options, wrapping any override already there (which then runs on the extended
keys/values). The self-attention of a block is the first attention call after the block starts
(a chained ``patches_replace["dit"]`` hook marks the start; Flux has one joint attention per
block, Wan calls self- before cross-attention); a call whose keys do not have the expected length
passes through unchanged and is counted.

Memory: two tensors of every image token's keys/values per block and CFG branch (FLUX.1-dev
1024²: ~2.9 GB per branch in bf16; Wan 2.1 1.3B 832x480x81: ~6 GB per branch).
"""

from __future__ import annotations

import torch

from ...families import FamilyBinding
from ...kernels.token_select import gather, rows_for, scatter
from ...runtime.block_hooks import chain_block_patches
from .fill import chunk_keys


class KVState:
    """One sampling run's key/value cache: ``(chunk key, block key) -> (k, v)`` of every grid token."""

    def __init__(self):
        self.cache: dict = {}
        self.missing = 0       # routed self-attention calls with no usable cache (ran without it)
        self.unexpected = 0    # first attention calls of a block that did not look like self-attention

    def clear(self):
        self.cache.clear()


class AttendSkipped:
    """The plan's attention hook for one step: ``attention(options) -> options``."""

    def __init__(self, state: KVState, binding: FamilyBinding, keep: torch.Tensor, grid_tokens: int, dense: bool):
        self.state = state
        self.binding = binding
        self.keep = keep
        self.grid_tokens = grid_tokens
        self.dense = dense
        self._skipped = None

    def skipped(self, device) -> torch.Tensor:
        """The grid tokens not in ``keep``, ascending: ``(N - K,)``, or a row per sample."""
        if self._skipped is None or self._skipped.device != device:
            keep = self.keep.to(device, torch.long)
            rows = keep.shape[0] if keep.ndim == 2 else 1
            mask = torch.ones(rows, self.grid_tokens, dtype=torch.bool, device=device)
            mask.scatter_(1, keep.view(rows, -1), False)
            skipped = mask.nonzero()[:, 1].view(rows, -1)
            self._skipped = skipped[0] if keep.ndim == 1 else skipped
        return self._skipped

    def __call__(self, options: dict) -> dict:
        call = _CallAttention(self, options)
        opts = chain_block_patches(options, {key: (call.entering(key), None) for key in self.binding.block_keys})
        call.inner = opts.get("optimized_attention_override")
        opts["optimized_attention_override"] = call.attention
        return opts


class _CallAttention:
    """One model call: which block runs, and the override itself."""

    def __init__(self, step: AttendSkipped, options: dict):
        self.step = step
        self.options = options
        self.inner = None          # the override that was there before (it runs on our keys/values)
        self.block = None          # key of the block running now
        self.calls_in_block = 0
        self.text = 0              # text tokens before the image tokens in a joint sequence (Flux)

    def entering(self, key):
        def enter(args: dict) -> dict:
            self.block, self.calls_in_block = key, 0
            txt = args.get("txt")
            if self.step.binding.joint_text and isinstance(txt, torch.Tensor) and txt.ndim == 3:
                self.text = txt.shape[1]
            return args
        return enter

    def _next(self, func, args, kwargs):
        if self.inner is not None:
            return self.inner(func, *args, **kwargs)
        return func(*args, **kwargs)

    def attention(self, func, *args, **kwargs):
        first = self.block is not None and self.calls_in_block == 0
        self.calls_in_block += 1
        if not first or len(args) < 3:
            return self._next(func, args, kwargs)
        q, k, v = args[:3]
        dim = 2 if kwargs.get("skip_reshape") else 1
        step = self.step
        kept = step.grid_tokens if step.dense else step.keep.shape[-1]
        start = self.text if step.binding.joint_text else 0
        if q.shape[dim] != k.shape[dim] or k.shape[dim] < start + kept or kwargs.get("mask") is not None:
            step.state.unexpected += 1
            return self._next(func, args, kwargs)
        k, v = self._extend(k, v, dim, start, kept)
        return self._next(func, (q, k, v) + tuple(args[3:]), kwargs)

    def _extend(self, k, v, dim, start, kept):
        step = self.step
        keys = chunk_keys(self.options, k.shape[0])
        per = k.shape[0] // len(keys)
        extra_k, extra_v = [], []
        keep_all = skipped_all = None
        if not step.dense:
            keep_all = rows_for(step.keep.to(k.device), k.shape[0])
            skipped_all = rows_for(step.skipped(k.device), k.shape[0])
            if keep_all is None or skipped_all is None:
                step.state.unexpected += 1
                return k, v
        for i, key in enumerate(keys):
            rows = slice(i * per, (i + 1) * per)
            k_img = k[rows].narrow(dim, start, kept)
            v_img = v[rows].narrow(dim, start, kept)
            cache_key = (key, self.block)
            if step.dense:
                step.state.cache[cache_key] = (k_img.contiguous(), v_img.contiguous())
                continue
            cached = step.state.cache.get(cache_key)
            if cached is None or cached[0].shape[dim] != step.grid_tokens or cached[0].shape[0] != per \
                    or cached[0].device != k.device:
                step.state.missing += 1
                return k, v
            keep = keep_all if keep_all.ndim == 1 else keep_all[rows]
            skipped = skipped_all if skipped_all.ndim == 1 else skipped_all[rows]
            ck = scatter(cached[0].to(k.dtype), keep, k_img, dim)
            cv = scatter(cached[1].to(v.dtype), keep, v_img, dim)
            step.state.cache[cache_key] = (ck, cv)
            extra_k.append(gather(ck, skipped, dim))
            extra_v.append(gather(cv, skipped, dim))
        if step.dense or not extra_k:
            return k, v
        extra_k = extra_k[0] if len(extra_k) == 1 else torch.cat(extra_k, dim=0)
        extra_v = extra_v[0] if len(extra_v) == 1 else torch.cat(extra_v, dim=0)
        return torch.cat([k, extra_k], dim=dim), torch.cat([v, extra_v], dim=dim)
