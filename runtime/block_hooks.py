"""Chained block hooks: our code runs around ComfyUI's transformer blocks, never instead of them.

Both families call ``transformer_options["patches_replace"]["dit"][key](args, {"original_block":
fn})`` for a block ``key`` that has an entry (``args``: ``img``, ``txt``, ``vec``, ``pe``, ...).
:func:`chain_block_patches` puts a ``before(args) -> args`` / ``after(out) -> out`` pair in front
of whatever entry another node already placed there (which still runs, on our arguments), on a
copy of the options: the model's own options are never changed.
"""

from __future__ import annotations

from typing import Callable

Before = Callable[[dict], dict]
After = Callable[[dict], dict]


def chain_block_patches(options: dict, patches: dict) -> dict:
    """``options`` (copied) with ``patches`` (``{key: (before, after)}``, either may be None)
    chained in front of existing ``patches_replace["dit"]`` entries."""
    opts = dict(options)
    replace = dict(opts.get("patches_replace") or {})
    dit = dict(replace.get("dit") or {})
    for key, (before, after) in patches.items():
        dit[key] = _chained(dit.get(key), before, after)
    replace["dit"] = dit
    opts["patches_replace"] = replace
    return opts


def _chained(existing, before: Before | None, after: After | None):
    def hook(args, extra):
        if before is not None:
            args = before(args)
        out = existing(args, extra) if existing is not None else extra["original_block"](args)
        return after(out) if after is not None else out
    return hook


def stream_patches(block_keys, first_block, last_block, first: Before, before: Before, last: After) -> dict:
    """The pairs of a path that reshapes the token stream for the blocks: ``first`` before the first
    block (it reshapes), ``before`` before every other block (it reads that block's arguments), and
    ``last`` after the last block (it restores); a one-block model gets ``(first, last)``."""
    pairs = {key: (before, None) for key in block_keys}
    pairs[first_block] = (first, last if first_block == last_block else None)
    if last_block != first_block:
        pairs[last_block] = (before, last)
    return pairs


def merge_pairs(*groups: dict) -> dict:
    """Several ``{key: (before, after)}`` maps as one: on a shared key the earlier map's
    ``before`` runs first and its ``after`` runs last (it wraps the later ones)."""
    out: dict = {}
    for group in groups:
        for key, (before, after) in group.items():
            if key not in out:
                out[key] = (before, after)
                continue
            b0, a0 = out[key]
            out[key] = (_then(b0, before), _then(after, a0))
    return out


def _then(first, second):
    if first is None or second is None:
        return first or second
    return lambda value: second(first(value))
