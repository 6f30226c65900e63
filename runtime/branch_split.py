"""Split a model call that batches the cond and uncond branches, when their plans differ.

ComfyUI batches the conditional and unconditional CFG branches of the same samples into one
model call when memory allows (``transformer_options["cond_or_uncond"]`` lists the chunks, in
batch order, each ``batch / chunks`` rows). A plan whose uncond branch runs fewer tokens (the
router's lower uncond budget, DC-DiT's "Lite-CFG") cannot run both in one tensor: the call is
made once per branch on its own rows, and the outputs are put back in the batch's order.

What is sliced: every tensor argument (and tensor in a list argument) whose first dimension is
the call's batch, and the per-chunk lists of the options (``cond_or_uncond``, ``uuids``);
everything else is shared by both calls. A call whose batch is not made of whole chunks runs
unsplit under the cond plan (the caller counts it).
"""

from __future__ import annotations

import inspect

import torch

PER_CHUNK_OPTIONS = ("cond_or_uncond", "uuids")
UNCOND = 1  # ComfyUI's value for the unconditional branch in ``cond_or_uncond``


def branch_rows(options: dict, batch: int) -> tuple[list[int], list[int]] | None:
    """Row indices of the cond chunks and of the uncond chunks of a call (None: no whole chunks)."""
    chunks = list(options.get("cond_or_uncond") or [])
    if not chunks or batch % len(chunks):
        return None
    per = batch // len(chunks)
    cond, uncond = [], []
    for i, kind in enumerate(chunks):
        (uncond if kind == UNCOND else cond).extend(range(i * per, (i + 1) * per))
    return cond, uncond


def _take(value, rows: torch.Tensor, batch: int):
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
        return value.index_select(0, rows.to(value.device))
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_take(v, rows, batch) for v in value)
    return value


def sliced(bound: inspect.BoundArguments, rows: list[int], batch: int) -> inspect.BoundArguments:
    """A copy of ``bound`` for the batch rows ``rows`` (whole chunks, in order)."""
    index = torch.tensor(rows, dtype=torch.long)
    arguments = {}
    for name, value in bound.arguments.items():
        if name == "transformer_options" and isinstance(value, dict):
            options = dict(value)
            chunks = list(value.get("cond_or_uncond") or [])
            per = batch // len(chunks) if chunks else batch
            keep_chunks = sorted({r // per for r in rows})
            for key in PER_CHUNK_OPTIONS:
                listed = value.get(key)
                if isinstance(listed, (list, tuple)) and len(listed) == len(chunks):
                    options[key] = [listed[c] for c in keep_chunks]
            arguments[name] = options
        elif name == "kwargs" and isinstance(value, dict):
            arguments[name] = {k: _take(v, index, batch) for k, v in value.items()}
        else:
            arguments[name] = _take(value, index, batch)
    return inspect.BoundArguments(bound.signature, arguments)


def call_by_branch(bound: inspect.BoundArguments, call_cond, call_uncond) -> torch.Tensor | None:
    """Run the cond rows through ``call_cond(bound)`` and the uncond rows through
    ``call_uncond(bound)`` (one call each, only for the branches present), and reassemble the
    output in batch order. None when the batch is not made of whole chunks."""
    x = bound.arguments["x"]
    batch = x.shape[0]
    options = bound.arguments.get("transformer_options") or {}
    rows = branch_rows(options, batch)
    if rows is None:
        return None
    cond, uncond = rows
    if not uncond:
        return call_cond(bound)
    if not cond:
        return call_uncond(bound)
    parts = [(cond, call_cond(sliced(bound, cond, batch))), (uncond, call_uncond(sliced(bound, uncond, batch)))]
    out = torch.empty((batch,) + tuple(parts[0][1].shape[1:]), dtype=parts[0][1].dtype, device=parts[0][1].device)
    for r, part in parts:
        out[torch.tensor(r, device=out.device)] = part.to(out.dtype)
    return out
