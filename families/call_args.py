"""Name the arguments of a call through ComfyUI's DIFFUSION_MODEL wrapper chain.

Flux and Wan ``_forward`` take different positional arguments (and they drift between ComfyUI
versions); binding them to the wrapped function's own signature gives every caller (the
sampling-loop wrappers, the adapter trainer's recorder) ``x``, ``timestep``, ``context``, ... by
name instead of by hard-coded position.
"""

from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=32)
def _signature(fn, drop_self: bool) -> inspect.Signature:
    sig = inspect.signature(fn)
    if drop_self:
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])
    return sig


def bind_call(executor, args, kwargs) -> inspect.BoundArguments:
    """Name the arguments of a DIFFUSION_MODEL call (``x``, ``timestep``, ``context``, ...).

    Uses the wrapped ``_forward``'s own signature, so it follows ComfyUI's argument order
    for each family and version instead of hard-coding positions. (Cached per function, not
    per bound method, so no model instance is kept alive by the cache.)
    """
    fn = executor.original
    func = getattr(fn, "__func__", None)
    sig = _signature(func, True) if func is not None else _signature(fn, False)
    return sig.bind(*args, **kwargs)


def call_bound(executor, bound: inspect.BoundArguments):
    return executor(*bound.args, **bound.kwargs)


