"""Idea 1, dynamic patch scheduling (DDiT): a per-step patch size, training-free or with adapters.

* config.py: the node's settings and the forced-schedule syntax;
* planner.py: the planner (Δ³ criterion or forced schedule) the runtime asks each step;
* adapter_file.py / adapter_attach.py: patch adapters (file format, fingerprint check, attach).
"""

from __future__ import annotations


def apply_patch_schedule(model, config):
    """A clone of ``model`` that samples with the dynamic patch schedule ``config``
    (a :class:`~.config.PatchScheduleConfig`); stacks with the pack's other nodes."""
    from ...runtime.sampling_hooks import add_planner
    from .planner import PatchSchedulePlanner

    return add_planner(model, PatchSchedulePlanner(config))
