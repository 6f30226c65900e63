"""The Dynamic Patch Schedule as a planner: the patch factor of each step (DDiT).

A forced schedule gives each step's factor as written; otherwise the Δ³ criterion
(kernels/criterion.py) picks the largest coarse factor whose third difference of the trajectory
is smooth enough (τ, ρ), after the warm-up and inside the start/end window (an empty window,
start >= end, leaves the automatic schedule idle). A coarse factor whose criterion block does not
fit the latent (a latent smaller than it) is not chosen.

Stacked with another patch schedule (two nodes in one graph), a step runs at the larger patch of
the two: each node asks for coarse steps only inside its own window and rules, so stacking two
windowed schedules gives both. A patch adapter attached to the model (ideas/patch/adapter_attach.py)
limits the automatic schedule to the sizes it covers and is handed to the coarse calls.
"""

from __future__ import annotations

from collections import deque

import torch

from ...families import FamilyBinding
from ...kernels.criterion import block_fits, choose_factor, third_difference
from ...runtime.token_plan import StepInput, TokenPlan
from .adapter_attach import ADAPTER_KEY, AdapterHolder
from .config import PatchScheduleConfig


class PatchSchedulePlanner:
    idea = "patch"
    label = "Dynamic Patch Schedule"

    def __init__(self, config: PatchScheduleConfig):
        self.config = config

    def start(self, binding: FamilyBinding, options: dict, total_steps: int) -> "PatchScheduleRun":
        return PatchScheduleRun(self.config, binding, options.get(ADAPTER_KEY), total_steps)


class PatchScheduleRun:
    """One sampling run of the schedule: keeps the last four latents for the criterion."""

    def __init__(self, config: PatchScheduleConfig, binding: FamilyBinding, adapter: AdapterHolder | None,
                 total_steps: int):
        self.config = config
        self.binding = binding
        self.adapter = adapter
        self.total_steps = total_steps
        self.idle = config.never_coarse
        self.needs_latent = not (config.forced or config.never_coarse)
        self.cuda_graphs = config.cuda_graphs
        self._trajectory: deque = deque(maxlen=4)  # (sigma, latent) of the most recent steps

    def plan(self, step: StepInput, plan: TokenPlan) -> TokenPlan:
        factor = self._factor(step)
        if factor <= plan.factor:
            return plan
        adapter = self.adapter
        if adapter is not None and not adapter.covers(factor):
            step.notes.append(f"{factor}p steps ran training-free: adapter {adapter.name} covers "
                              + ", ".join(f"{k}p" for k in adapter.factors))
            adapter = None
        return plan.replace(factor=factor, coarse_adapter=adapter, coarse_embed=self.config.coarse_embed,
                            coarse_deembed=self.config.coarse_deembed)

    def _factor(self, step: StepInput) -> int:
        cfg = self.config
        if cfg.forced:
            return cfg.forced[step.step] if step.step < len(cfg.forced) else 1
        latent = step.latent()
        if latent is not None:  # float32 copy: the third difference is small, and the sampler's
            # tensor must not change under us
            self._trajectory.append((step.sigma, latent.detach().to(torch.float32, copy=True)))
        # with an adapter, the automatic schedule picks only the patch sizes it was trained for
        allowed = self.adapter.factors if self.adapter is not None else None
        candidates = tuple(k for k in cfg.candidate_factors if allowed is None or k in allowed)
        n = max(self.total_steps, 1)
        if step.step < cfg.warmup_steps or not (cfg.start_percent <= step.step / n < cfg.end_percent):
            return 1
        if len(self._trajectory) < 4:
            return 1
        sig = [s for s, _ in self._trajectory]
        lat = [z for _, z in self._trajectory]
        if len({tuple(z.shape) for z in lat}) != 1:
            return 1
        d3 = third_difference(lat, sig)
        if not candidates:
            return 1
        # a latent smaller than a candidate's block (e.g. 9x5 cells against 4p's 8x8) cannot be
        # judged at that size: the candidate is skipped for this step (choose_factor does so too)
        patch = self.binding.native_patch
        too_big = [k for k in candidates if not block_fits(d3.shape, k * patch)]
        if too_big:
            h, w = d3.shape[-2:]
            step.notes.append(", ".join(f"{k}p" for k in too_big) + f" not chosen: a {too_big[0] * patch}x"
                              f"{too_big[0] * patch} block does not fit the {h}x{w} latent")
        factor, scores = choose_factor(d3, patch, candidates, cfg.tau, cfg.rho)
        step.scores.update(scores)
        return factor
