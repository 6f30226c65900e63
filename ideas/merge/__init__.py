"""Idea 3, token merging with a global pattern (LGM, training-free patterns so far).

* config.py: the node's settings;
* planner.py: the planner that puts the step's merge pattern into the token plan;
* the patterns themselves: kernels/merge_pattern.py; their execution: runtime/merge_path.py.
"""

from __future__ import annotations


def apply_token_merge(model, config):
    """A clone of ``model`` that samples with Token Merge ``config`` (a
    :class:`~.config.TokenMergeConfig`); stacks with the pack's other nodes. Raises
    :class:`~elastic_tokens.families.UnsupportedModelError` for models other than Flux / Wan."""
    from ...runtime.sampling_hooks import add_planner
    from .planner import TokenMergePlanner

    from ...families import binding_for

    binding_for(model)  # the clear error before anything else
    return add_planner(model, TokenMergePlanner.for_model(config, model))
