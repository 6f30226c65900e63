"""Replay coarse-step forwards as CUDA graphs.

A coarse step has 3-16x fewer tokens, and at that size a 12B DiT is bound by Python and
kernel launches, not by the GPU (DESIGN.md section 6: FLUX at 2p ran 56-83 ms eager, 54 ms
as a graph). Within one sampling run the model's weights and the non-tensor arguments do
not change, so each (patch factor, input shapes) forward is captured once and replayed.

Only used when the node's ``cuda_graphs`` switch is on, on CUDA, and when nothing else would
be frozen by the capture (see :func:`graphable`). The first call of a shape runs eagerly
(warm-up), the second captures, later calls replay. Graphs live only for one run.
"""

from __future__ import annotations

import logging

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
    """Captured forwards of one sampling run, keyed by factor and input signature."""

    # model classes whose forward cannot be captured (e.g. it copies a CPU tensor to the GPU);
    # remembered for the process so each run does not pay a failed capture and warn again
    uncapturable: set[str] = set()

    def __init__(self, model_class: str = ""):
        self.model_class = model_class
        self._entries: dict[tuple, object] = {}
        self._pool = None
        self.failed = False
        self.replays = 0

    def call(self, factor: int, bound, run_eager):
        """Run ``run_eager(bound)`` eagerly, or as a captured graph when seen before."""
        key = (factor, _signature(bound.arguments))
        entry = self._entries.get(key)
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
