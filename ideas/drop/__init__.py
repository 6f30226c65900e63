"""Idea 2, token dropping (DC-DiT / RAS): the Elastic Token Router, training-free or learned.

* config.py: the node's settings (budget, scorer, fill-back, window, dense refresh);
* planner.py: the planner that scores the image tokens each step and keeps the top share
  (kernels/token_scores.py), on the runtime's token path (runtime/token_path.py);
* fill.py: how the skipped tokens get an output back (cached output per CFG branch, or the
  nearest computed token's);
* router_net.py / router_file.py: the learned router (scorer ``learned``): its tiny network and
  inputs, its .safetensors file and the check that it was trained on this model (trained by
  training/router.py, attached by the "Load Token Router" node).
"""

from __future__ import annotations


def apply_router(model, config):
    """A clone of ``model`` that samples with the Elastic Token Router ``config`` (a
    :class:`~.config.RouterConfig`); stacks with the pack's other nodes (one plan per step)."""
    from ...runtime.sampling_hooks import add_planner
    from .planner import RouterPlanner

    return add_planner(model, RouterPlanner(config))
