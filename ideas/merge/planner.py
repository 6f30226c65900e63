"""Token Merge as a planner: a global merge pattern on the native full-grid steps of a window.

The pattern (kernels/merge_pattern.py, or with order ``learned`` the attached
learned pattern of learned_pattern.py) depends on the step's token grid and the settings only,
so every step and sample of a run merge alike; it is made once per grid and run. A step is merged
when its sigma lies in the node's window (``start_percent`` / ``end_percent`` through the model's
``percent_to_sigma``, as ComfyUI's own start/end settings) and the plan so far runs the native
full grid: a coarse step of a stacked Dynamic Patch Schedule, or a step whose tokens a router
already chose (routed, or dense to renew its caches), is left as it is (one token reduction per
step), and the log says how many such steps the window had. Stacked with the router, Token Merge
therefore acts on the steps outside the router's window (by default the first 20%).
"""

from __future__ import annotations

import logging

from ...families import FamilyBinding
from ...kernels.merge_pattern import merge_pattern
from ...runtime.token_plan import MergePattern, StepInput, TokenPlan
from .config import TokenMergeConfig
from .learned_pattern import PatternError, attached_pattern

log = logging.getLogger("elastic_tokens")


class TokenMergePlanner:
    idea = "merge"
    label = "Token Merge"

    def __init__(self, config: TokenMergeConfig, sigma_start: float, sigma_end: float):
        self.config = config
        self.sigma_start = float(sigma_start)   # merge steps with sigma_end < sigma <= sigma_start
        self.sigma_end = float(sigma_end)

    @classmethod
    def for_model(cls, config: TokenMergeConfig, model) -> "TokenMergePlanner":
        """The planner with the window in sigmas of ``model``'s sampling (a ModelPatcher)."""
        sampling = model.get_model_object("model_sampling")
        return cls(config, sampling.percent_to_sigma(config.start_percent),
                   sampling.percent_to_sigma(config.end_percent))

    def start(self, binding: FamilyBinding, options: dict, total_steps: int) -> "TokenMergeRun":
        learned = None
        if self.config.order == "learned" and not self.config.never_merges:
            learned = attached_pattern(options)
            if learned is None:
                raise PatternError("Token Merge: order 'learned' needs a merge pattern: put a 'Load Merge "
                                   "Pattern' node (a pattern trained on this model) on the MODEL path, or "
                                   "pick a training-free order (spread, border_first).")
        return TokenMergeRun(self, binding, learned)


class TokenMergeRun:
    needs_latent = False

    def __init__(self, planner: TokenMergePlanner, binding: FamilyBinding, learned=None):
        self.planner = planner
        self.learned = learned  # a LearnedPattern (order "learned")
        self.config = planner.config
        self.binding = binding
        self.idle = self.config.never_merges
        self._patterns: dict = {}
        self.left_to_others = 0  # window steps whose tokens another planner had chosen

    def pattern(self, grid: tuple) -> MergePattern | None:
        """The pattern of a token grid ``(frames, rows, cols)``, or None where nothing merges."""
        if grid not in self._patterns:
            cfg = self.config
            if self.learned is not None:
                groups, sizes = self.learned.pattern(grid, cfg.ratio, cfg.video_mode)
                note = self.learned.held_out_note(cfg.ratio)
                if note:
                    log.warning(f"Elastic Tokens: {note}")
                name = f"learned {self.learned.name}/{cfg.video_mode} {cfg.ratio:g}"
            else:
                groups, sizes = merge_pattern(grid, cfg.ratio, cfg.order, cfg.video_mode)
                name = f"{cfg.order}/{cfg.video_mode} {cfg.ratio:g}"
            self._patterns[grid] = (MergePattern(groups, int(sizes.numel()), name, cfg.proportional_attention,
                                                 cfg.unmerge)
                                    if sizes.numel() < groups.numel() else None)
        return self._patterns[grid]

    def plan(self, step: StepInput, plan: TokenPlan) -> TokenPlan:
        p = self.planner
        if plan.factor != 1 or not (p.sigma_end < step.sigma <= p.sigma_start):
            return plan
        if plan.keep is not None or plan.merge is not None:
            # a router chose this step's tokens (the kept set is per sample: one global pattern
            # cannot group it into one token count per batch); finish() says how often
            self.left_to_others += 1
            return plan
        pattern = self.pattern(self.binding.grid(step.latent_shape))
        return plan if pattern is None else plan.replace(merge=pattern)

    def finish(self, report) -> None:
        if self.left_to_others:
            merged = sum(1 for m in report.step_merged if m)
            report.notes.append(f"Token Merge: {self.left_to_others} steps of its window had their tokens chosen "
                                f"by another node (Elastic Token Router), so it merged {merged} steps (one token "
                                f"reduction per step)")
