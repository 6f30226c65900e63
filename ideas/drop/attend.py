"""Computed tokens also attend to the skipped ones (RAS): keys/values of skipped tokens from cache.

On a routed step only the kept image tokens run through the blocks, so by default they attend
only to each other (and the text). With ``attend_skipped`` the self-attention of every block also
gets the keys and values (after RoPE: each keeps its own position) of the skipped image tokens,
from the last step that computed them; dense steps fill this cache, routed steps renew the kept
tokens' entries in place. Kept per block and batch layout (the conditionings' uuids in the
order ComfyUI batched them, as the output cache tells its branches apart); a call whose layout
has no cache yet runs without it and is counted.

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
from ...kernels.token_select import rows_for, scatter_
from ...runtime.block_hooks import chain_block_patches
from .fill import chunk_keys


class KVState:
    """One sampling run's key/value cache: ``(batch layout, block key) -> (k, v)`` of the whole
    stream (every grid token)."""

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

    def extra_keys(self) -> int | None:
        """For the FLOP account: on a routed step the computed tokens read every grid token's
        keys; a dense step attends as the plain model."""
        return None if self.dense else self.grid_tokens

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
        """The call's keys/values with every grid token: a buffer per block and batch layout
        holding the whole stream (text, grid, tokens after it) from the last dense step, into
        which this call writes its text, its kept tokens and what follows the grid, in place; the
        attention then reads the buffer (key order does not matter to attention)."""
        step = self.step
        n = step.grid_tokens
        tail = k.shape[dim] - start - kept
        cache_key = (tuple(chunk_keys(self.options, k.shape[0])), self.block)
        if step.dense:
            step.state.cache[cache_key] = (k.clone(), v.clone())
            return k, v
        cached = step.state.cache.get(cache_key)
        full_shape = list(k.shape)
        full_shape[dim] = start + n + tail
        if cached is None or list(cached[0].shape) != full_shape or cached[0].device != k.device:
            step.state.missing += 1
            return k, v
        keep = rows_for(step.keep.to(k.device), k.shape[0])
        if keep is None:
            step.state.unexpected += 1
            return k, v
        if cached[0].dtype != k.dtype:
            cached = step.state.cache[cache_key] = (cached[0].to(k.dtype), cached[1].to(v.dtype))
        for buf, new in zip(cached, (k, v)):
            if start:
                buf.narrow(dim, 0, start).copy_(new.narrow(dim, 0, start))
            if tail:
                buf.narrow(dim, start + n, tail).copy_(new.narrow(dim, start + kept, tail))
            scatter_(buf.narrow(dim, start, n), keep, new.narrow(dim, start, kept), dim)
        return cached
