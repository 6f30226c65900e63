"""Replay coarse-step forwards as CUDA graphs.

A coarse step has 4-16x fewer tokens, and at that size a 12B DiT is bound by Python and
kernel launches, not by the GPU (docs/design_notes.md section 1). Within one sampling run the model's weights and the non-tensor arguments do
not change, so each (patch factor, input shapes) forward is captured once and replayed.

Only used when the node's ``cuda_graphs`` switch is on, on CUDA, and when nothing else would
be frozen by the capture (see :func:`graphable`). The first call of a shape runs eagerly
(warm-up), the second captures, later calls replay.

Graphs are kept across sampling runs of the same model (:func:`cache_for`) as long as every
weight still lives at the address it was captured from (a weight patched in place is read
afresh by each replay; one moved or re-created invalidates the cache), and are dropped when
ComfyUI moves the model's weights (:func:`drop_if_stale`, from the patcher's ON_DETACH callback).
"""

from __future__ import annotations

import itertools
import logging
import weakref

import torch


def graphable(arguments: dict, skip: tuple[str, ...] = ("transformer_options",)) -> bool:
    """Arguments are CUDA tensors, None or plain scalars (no lists/dicts of tensors)."""
    for name, value in arguments.items():
        if name in skip or value is None or isinstance(value, (bool, int, float, str)):
            continue
        if isinstance(value, torch.Tensor):
            if not value.is_cuda:
                return False
            continue
        if name == "kwargs" and isinstance(value, dict):
            if not graphable(value, skip):
                return False
            continue
        return False
    return True


def _signature(arguments: dict) -> tuple:
    key = []
    for name, value in sorted(arguments.items()):
        if name == "transformer_options":
            continue
        if isinstance(value, torch.Tensor):
            key.append((name, tuple(value.shape), value.dtype, value.device))
        elif isinstance(value, dict):
            key.append((name, _signature(value)))
        else:
            key.append((name, value))
    return tuple(key)


def _tensors(arguments: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for name, value in arguments.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, dict) and name == "kwargs":
            out.update(_tensors(value, prefix + "kwargs."))
    return out


class GraphCache:
    """Captured coarse forwards of one model, kept across runs while its weights stay in place.

    Keyed by patch factor, input shapes/dtypes and the transformer options that change the
    computation (RoPE options, patches).
    """

    # model classes whose forward cannot be captured (e.g. it copies a CPU tensor to the GPU);
    # remembered for the process so each run does not pay a failed capture and warn again
    uncapturable: set[str] = set()

    def __init__(self, model_class: str = "", fingerprint: tuple = ()):
        self.model_class = model_class
        self.fingerprint = fingerprint
        self._entries: dict[tuple, object] = {}
        self._pool = None
        self.failed = False
        self.replays = 0

    def call(self, factor: int, bound, run_eager):
        """Run ``run_eager(bound)`` eagerly, or as a captured graph when seen before."""
        key = (factor, _signature(bound.arguments), _options_key(bound.arguments.get("transformer_options")))
        entry = self._entries.get(key)
        if entry is None and not self.failed:
            logging.debug("Elastic Tokens: new CUDA graph key %s (have %d)", key, len(self._entries))
        if entry is None or self.failed:
            self._entries.setdefault(key, "warm")
            return run_eager(bound)
        if entry == "warm":
            entry = self._capture(key, bound, run_eager)
            if entry is None:
                return run_eager(bound)
        graph, static_inputs, static_output = entry
        for name, tensor in _tensors(bound.arguments).items():
            static_inputs[name].copy_(tensor)
        graph.replay()
        self.replays += 1
        return static_output.clone()

    def _capture(self, key, bound, run_eager):
        inputs = _tensors(bound.arguments)
        static = {name: t.clone() for name, t in inputs.items()}
        for name, tensor in static.items():
            _assign(bound.arguments, name, tensor)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, pool=self._pool):
                output = run_eager(bound)
        except Exception as exc:  # capture is an optimisation: never fail the run for it
            logging.warning("Elastic Tokens: CUDA graphs are not possible for %s (%s); its coarse steps "
                            "run eagerly.", self.model_class or "this model", exc)
            self.failed = True
            GraphCache.uncapturable.add(self.model_class)
            torch.cuda.synchronize()
            for name, tensor in inputs.items():
                _assign(bound.arguments, name, tensor)
            return None
        entry = (graph, static, output)
        self._entries[key] = entry
        return entry

    def release(self):
        self._entries.clear()
        self._pool = None


def _assign(arguments: dict, name: str, tensor: torch.Tensor) -> None:
    if name.startswith("kwargs."):
        arguments["kwargs"][name[len("kwargs."):]] = tensor
    else:
        arguments[name] = tensor


def _options_key(options) -> tuple:
    """What in ``transformer_options`` changes the captured computation: patches and RoPE options."""
    if not isinstance(options, dict):
        return ()
    rope = tuple(sorted((options.get("rope_options") or {}).items()))
    patches = []
    for group in ("patches", "patches_replace"):
        for name, value in sorted((options.get(group) or {}).items(), key=lambda kv: str(kv[0])):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            patches.append((group, str(name), tuple((str(k), id(v)) for k, v in items)))
    return rope, tuple(patches)


_PERSISTENT: "weakref.WeakKeyDictionary[torch.nn.Module, GraphCache]" = weakref.WeakKeyDictionary()


def weights_fingerprint(model: torch.nn.Module) -> tuple:
    return tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))


def cache_for(model: torch.nn.Module) -> GraphCache:
    """The graph cache of ``model``, fresh if its weights moved since the graphs were captured."""
    fingerprint = weights_fingerprint(model)
    cache = _PERSISTENT.get(model)
    if cache is None or cache.fingerprint != fingerprint:
        if cache is not None:
            logging.debug("Elastic Tokens: weights of %s moved; recapturing CUDA graphs", type(model).__qualname__)
            cache.release()
        cache = GraphCache(type(model).__qualname__, fingerprint)
        _PERSISTENT[model] = cache
    return cache


def drop_cache(model: torch.nn.Module) -> None:
    cache = _PERSISTENT.pop(model, None)
    if cache is not None:
        cache.release()


def drop_if_stale(model: torch.nn.Module) -> None:
    """Free the graphs of ``model`` if its weights no longer live where they were captured.

    Called when ComfyUI detaches a patcher (that happens after every run, and when a model is
    offloaded): graphs of a model still in place stay for the next run, those of a model moved
    off the GPU go at once instead of holding GPU memory until its next run.
    """
    cache = _PERSISTENT.get(model)
    if cache is not None and cache.fingerprint != weights_fingerprint(model):
        drop_cache(model)
