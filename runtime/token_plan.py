"""One token plan per model call, and the planners that produce it.

A step's work is a :class:`TokenPlan`: the patch factor the latent is read at (dynamic patch
scheduling), which image tokens of that grid go through the blocks (token dropping), and how
they are grouped (token merging). Planners (one per node in the graph) refine the plan of a step
in a fixed order of ideas, whatever the order of the nodes in the graph (:data:`IDEA_ORDER`):
the patch factor first (it sets the grid), then the kept tokens of that grid, then their groups.
Several planners of one idea each see the plan so far and return it refined; what that means is
the idea's to define (two patch schedules: the larger patch of the two, see
ideas/patch/planner.py). docs/runtime.md has the whole picture.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from ..families import FamilyBinding

IDEA_ORDER = ("patch", "drop", "merge")


@dataclass(frozen=True, eq=False)
class MergePattern:
    """Groups of the tokens that go through the blocks: token ``i`` joins group ``groups[i]``
    (runtime/merge_path.py executes it; kernels/merge_pattern.py makes the training-free ones)."""

    groups: torch.Tensor   # (tokens,) long, values 0..count-1, every group non-empty
    count: int
    name: str = ""
    proportional: bool = True  # merged keys count |S| times in attention (+log|S| on their logits)
    unmerge: str = "velocity"  # how outputs go back to the tokens (runtime/merge_path.py UNMERGE_MODES):
                               # "velocity" (default): the group's clean estimate, each token's own noise


@dataclass(frozen=True, eq=False)
class TokenPlan:
    """What one model call computes (per sample; cond and uncond share it)."""

    factor: int = 1                        # latent read at factor x the native patch (1 = native)
    keep: torch.Tensor | None = None       # ordered grid-token indices (at ``factor``) through the blocks:
                                           # (K,) for every sample, or (samples, K) one row per sample
    merge: MergePattern | None = None      # how the kept tokens are grouped
    coarse_adapter: object | None = None   # learned parts for a coarse call (ideas/patch/adapter_attach.py)
    coarse_embed: str = "area"             # how a coarse patch is embedded (kernels/resize.py)
    coarse_deembed: str = "bilinear"       # how a coarse prediction is brought back to full size
    fill: object | None = None             # TokenFill: skipped tokens' hidden state after the blocks
    attention: object | None = None        # keep plans: attention(options) -> the call's options (an
                                           # attention override, e.g. ideas/drop/attend.py); its
                                           # optional extra_keys() -> the image keys its self-
                                           # attention reads, or None, enters the FLOP account
    uncond: "TokenPlan | None" = None      # the unconditional CFG branch's own plan where it differs
                                           # (fewer tokens); calls batching both branches are split
                                           # (runtime/branch_split.py)

    @property
    def is_native(self) -> bool:
        return self.factor == 1 and self.keep is None and self.merge is None

    @property
    def selects_tokens(self) -> bool:
        return self.keep is not None or self.merge is not None

    def replace(self, **changes) -> "TokenPlan":
        return dataclasses.replace(self, **changes)

    def tokens(self, grid_tokens: int) -> int:
        """Image tokens through the blocks, of a grid of ``grid_tokens`` at this plan's factor."""
        if self.merge is not None:
            return self.merge.count
        return grid_tokens if self.keep is None else self.keep.shape[-1]

    def cost(self, binding: FamilyBinding, latent_shape, text_tokens: int) -> tuple[int, float, float]:
        """``(image tokens, native FLOPs, planned FLOPs)`` of one sample's forward."""
        tokens = self.tokens(binding.grid_tokens(latent_shape, self.factor))
        native = binding.step_flops(binding.grid_tokens(latent_shape), text_tokens)
        # an attention hook that widens the keys (the router's K/V cache) says by how much
        keys = getattr(self.attention, "extra_keys", None)
        return tokens, native, binding.step_flops(tokens, text_tokens, keys() if callable(keys) else None)


NATIVE = TokenPlan()


class TokenFill(Protocol):
    """How a ``keep`` plan fills the skipped tokens after the last block (None: each keeps its
    hidden state from before the blocks). ``grid``: ``(B, grid tokens, D)``, computed tokens at
    ``keep`` and skipped ones at their pre-block state; ``options``: the call's
    transformer_options (``uuids`` / ``cond_or_uncond`` tell the batch chunks apart). Returns the
    grid to de-embed; it may keep what it needs (a per-branch cache), never change ``grid``."""

    def __call__(self, grid: torch.Tensor, keep: torch.Tensor, options: dict) -> torch.Tensor: ...


@dataclass
class StepInput:
    """What a planner may read to plan one sampling step (read once, on the step's first call)."""

    step: int
    total_steps: int
    sigma: float
    binding: FamilyBinding
    latent_shape: tuple
    options: dict                               # the call's transformer_options (read only)
    latent: Callable[[], torch.Tensor | None]   # the sampler's float32 latent (first cond chunk)
    scores: dict = field(default_factory=dict)  # what planners measured, for the run report
    notes: list = field(default_factory=list)   # one-off remarks for the run's log line
    percent_to_sigma: Callable[[float], float] | None = None  # the model's own (sampling windows)


class PlannerRun(Protocol):
    """A planner's state for one sampling run."""

    idle: bool            # never changes a plan in this run (the runtime then skips planning)
    needs_latent: bool    # reads StepInput.latent (the runtime hands it over in full precision)

    def plan(self, step: StepInput, plan: TokenPlan) -> TokenPlan: ...

    # optional: ``finish(report)`` is called once at the end of the run, before its log line
    # (a planner may add notes to ``report.notes`` there)


class Planner(Protocol):
    """A node's settings: makes a fresh :class:`PlannerRun` for each sampling run."""

    idea: str             # one of IDEA_ORDER
    label: str            # the node's display name, for the log

    def start(self, binding: FamilyBinding, options: dict, total_steps: int) -> PlannerRun: ...


def ordered(planners) -> list:
    """Planners in the order they refine a plan: by idea (IDEA_ORDER), then as stacked."""
    for p in planners:
        if p.idea not in IDEA_ORDER:
            raise ValueError(f"unknown idea {p.idea!r} of planner {p.label!r}; known: {IDEA_ORDER}")
    return sorted(planners, key=lambda p: IDEA_ORDER.index(p.idea))


def compose(runs, step: StepInput, plan: TokenPlan = NATIVE) -> TokenPlan:
    """The step's plan: each planner run (already :func:`ordered`) refines the plan so far."""
    for run in runs:
        if not run.idle:
            plan = run.plan(step, plan)
    return plan
