"""Per-sampling-run state of the runtime: one object per KSampler run.

Created fresh by the OUTER_SAMPLE wrapper (so nothing leaks between runs), it maps each model
call to a sampling step, asks the stacked planners for that step's plan once (cond, uncond and
the extra calls of multi-evaluation samplers such as Heun reuse it), and keeps the one FLOP
account and report of the run.
"""

from __future__ import annotations

import torch

from ..families import FamilyBinding
from .coarse import timestep_per_sigma
from .report import RunReport
from .token_plan import NATIVE, StepInput, TokenPlan, compose, ordered


class SamplingRun:
    def __init__(self, planners, binding: FamilyBinding, sigmas: torch.Tensor, model_sampling, options: dict):
        self.binding = binding
        self.sigmas = sigmas.detach().flatten().float().cpu().tolist()  # one copy, not a sync per step
        self.total_steps = max(len(self.sigmas) - 1, 0)
        self.t_per_sigma = timestep_per_sigma(model_sampling)
        self.percent_to_sigma = getattr(model_sampling, "percent_to_sigma", None)
        planners = ordered(planners)
        self.runs = [p.start(binding, options, self.total_steps) for p in planners]
        # a run whose planners never act makes no per-step decisions (and no GPU sync): all native
        self.idle = all(r.idle for r in self.runs)
        self.needs_latent = any(getattr(r, "needs_latent", False) for r in self.runs)
        self.cuda_graphs = any(getattr(r, "cuda_graphs", False) for r in self.runs)
        n = self.total_steps
        self.report = RunReport(n, [p.label for p in planners], [1 if self.idle else 0] * n, [0] * n, [0] * n,
                                [{} for _ in range(n)])
        self.report.step_merged = [0] * n
        self._plans: dict[int, TokenPlan] = {}
        self.sampler_input: tuple | None = None  # (latent, sigma) of the current call before the dtype cast
        self.graphs = None  # the model's GraphCache, set by the executor when CUDA graphs are on
        self.graph_replays_before = 0

    # -- steps -------------------------------------------------------------------------
    def sigma_of(self, timestep: torch.Tensor) -> torch.Tensor:
        return timestep.float() / self.t_per_sigma

    def step_index(self, sigma: float) -> int:
        """Index ``i`` of the step with ``sigmas[i] >= sigma > sigmas[i+1]``.

        Extra evaluations between grid sigmas (dpmpp_2s, Heun) belong to the step they sit in.
        """
        tol = 1e-5 * max(1.0, abs(sigma))
        for i in range(self.total_steps - 1, -1, -1):
            if self.sigmas[i] >= sigma - tol:
                return i
        return 0

    # -- plans -------------------------------------------------------------------------
    def plan_for(self, step: int, sigma: float, latent_shape, options: dict, latent) -> TokenPlan:
        """The plan of ``step``, made on the step's first call; ``latent()`` gives the sampler's
        float32 latent to planners that read it."""
        if self.idle:
            return NATIVE
        plan = self._plans.get(step)
        if plan is None:
            info = StepInput(step, self.total_steps, sigma, self.binding, tuple(latent_shape), options, latent,
                             percent_to_sigma=self.percent_to_sigma)
            plan = self._plans[step] = compose(self.runs, info)
            if step < self.total_steps:
                self.report.step_factors[step] = plan.factor
                if info.scores:
                    self.report.step_scores[step] = info.scores
            for text in info.notes:
                self.note(text)
        return plan

    # -- accounting --------------------------------------------------------------------
    def account(self, step: int | None, latent_shape, text_tokens: int, plan: TokenPlan) -> None:
        """Count one model call of ``latent_shape`` (batch first) run under ``plan`` at ``step``
        (None: an idle run, whose every step is native)."""
        b = self.binding
        tokens, native, used = plan.cost(b, latent_shape, text_tokens)
        batch = latent_shape[0]
        self.report.flops_native += batch * native
        self.report.flops_used += batch * used
        self.report.calls[plan.factor] += 1
        steps = range(self.total_steps) if step is None else (step,) if step < self.total_steps else ()
        for i in steps:
            if not self.report.step_tokens[i]:
                self.report.step_tokens[i] = tokens
                self.report.step_grid_tokens[i] = b.grid_tokens(latent_shape, plan.factor)
                if plan.merge is not None:
                    self.report.step_merged[i] = int(plan.merge.groups.numel()) - plan.merge.count

    def note(self, text: str) -> None:
        if text not in self.report.notes:
            self.report.notes.append(text)

    def fallback(self, reason: str) -> None:
        self.report.fallbacks[reason] += 1

    def finish(self) -> None:
        """Let planner runs that want it (``finish(report)``) add to the report before it is logged."""
        for r in self.runs:
            finish = getattr(r, "finish", None)
            if finish is not None:
                try:
                    finish(self.report)
                except Exception as e:  # a report note must never hide the run's own result or error
                    self.note(f"{type(r).__name__}.finish failed: {type(e).__name__}: {e}")

    def release(self) -> None:
        """Drop this run's tensors (graphs stay with the model, see graph_replay.cache_for)."""
        self._plans.clear()
        self.runs = []
        self.sampler_input = None
        self.graphs = None
