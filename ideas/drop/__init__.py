"""Idea 2, token dropping (DC-DiT / RAS): the Elastic Token Router, training-free.

* config.py: the node's settings (budget, scorer, fill-back, window, dense refresh);
* planner.py: the planner that scores the image tokens each step and keeps the top share
  (kernels/token_scores.py), on the runtime's token path (runtime/token_path.py);
* fill.py: how the skipped tokens get an output back (cached output per CFG branch, or the
  nearest computed token's).
"""

from __future__ import annotations


def apply_router(model, config):
    """A clone of ``model`` that samples with the Elastic Token Router ``config`` (a
    :class:`~.config.RouterConfig`); stacks with the pack's other nodes (one plan per step)."""
    from ...runtime.sampling_hooks import add_planner
    from .planner import RouterPlanner

    return add_planner(model, RouterPlanner(config))
