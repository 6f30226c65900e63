"""Per-sampling-run state of the Dynamic Patch Schedule: one object per KSampler run.

Created fresh by the OUTER_SAMPLE wrapper (so nothing leaks between runs), it maps each
model call to a sampling step, decides that step's patch size once (cond, uncond and any
extra calls of multi-evaluation samplers such as Heun reuse the decision), keeps the last
four latents for the criterion, and counts what the run saved for the log.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

import torch

from ..adapters.bindings import FamilyBinding
from ..kernels.criterion import choose_factor, third_difference
from .schedule_config import PatchScheduleConfig


@dataclass
class RunReport:
    """What one sampling run did; kept on the node's holder as ``last_report``."""

    total_steps: int
    step_factors: list[int] = field(default_factory=list)   # per step; 0 = step never evaluated
    step_scores: list[dict] = field(default_factory=list)   # criterion scores where computed
    calls: Counter = field(default_factory=Counter)         # model calls per factor
    fallbacks: Counter = field(default_factory=Counter)     # coarse steps run native, by reason
    flops_native: float = 0.0
    flops_used: float = 0.0
    seconds: float = 0.0
    graph_replays: int = 0                                   # coarse calls replayed as CUDA graphs
    adapter_calls: int = 0                                   # coarse calls run with a patch adapter
    notes: list[str] = field(default_factory=list)           # one-off remarks for the log

    @property
    def saved_fraction(self) -> float:
        return 1.0 - self.flops_used / self.flops_native if self.flops_native else 0.0

    @property
    def estimated_speedup(self) -> float:
        return self.flops_native / self.flops_used if self.flops_used else 1.0

    def summary(self) -> str:
        counts = Counter(k for k in self.step_factors if k)
        parts = ", ".join(f"{counts.get(k, 0)} at {'p' if k == 1 else f'{k}p'}" for k in (1, 2, 4))
        text = (f"Dynamic Patch Schedule: {sum(counts.values())}/{self.total_steps} steps ({parts}); "
                f"{100 * self.saved_fraction:.0f}% of transformer FLOPs skipped, "
                f"~{self.estimated_speedup:.2f}x estimated")
        if self.seconds:
            text += f"; sampling took {self.seconds:.2f} s"
        if self.fallbacks:
            reasons = ", ".join(f"{n}x {r}" for r, n in self.fallbacks.items())
            text += f"; ran native instead of coarse: {reasons}"
        if self.adapter_calls:
            text += f"; {self.adapter_calls} coarse calls with the patch adapter"
        for note in self.notes:
            text += f"; {note}"
        return text


class ScheduleRun:
    def __init__(self, config: PatchScheduleConfig, binding: FamilyBinding, sigmas: torch.Tensor, model_sampling):
        self.config = config
        self.binding = binding
        self.sigmas = sigmas.detach().flatten().float().cpu().tolist()  # one copy, not a sync per step
        self.total_steps = max(len(self.sigmas) - 1, 0)
        # ComfyUI's flow models feed the transformer timestep = sigma * m (m = 1 for Flux, 1000 for Wan)
        self.t_per_sigma = float(model_sampling.timestep(torch.tensor(1.0)))
        # a never-coarse run makes no per-step decisions (and no GPU sync): every step is native
        first = 1 if config.never_coarse else 0
        self.report = RunReport(self.total_steps, [first] * self.total_steps, [{} for _ in range(self.total_steps)])
        self._decided: dict[int, int] = {}
        self._trajectory: deque = deque(maxlen=4)  # (sigma, latent) of the most recent steps
        self.sampler_input: tuple | None = None  # (latent, sigma) of the current call before the dtype cast
        self.graphs = None  # the model's GraphCache, set by the wrapper when CUDA graphs are on
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

    # -- decisions ---------------------------------------------------------------------
    def factor_for_step(self, step: int, latent: torch.Tensor | None, sigma: float,
                        allowed: tuple[int, ...] | None = None) -> int:
        """Patch-size factor of ``step``, decided on the first call of that step.

        ``allowed`` (the coarse factors a patch adapter covers) limits the dynamic schedule's
        choice; a forced schedule is followed as written.
        """
        if step in self._decided:
            return self._decided[step]
        cfg = self.config
        if cfg.forced:
            factor = cfg.forced[step] if step < len(cfg.forced) else 1
        else:
            if latent is not None:  # float32 copy: the third difference is small, and the
                # sampler's tensor must not change under us
                self._trajectory.append((sigma, latent.detach().to(torch.float32, copy=True)))
            factor = self._dynamic_factor(step, allowed)
        self._decided[step] = factor
        if step < self.total_steps:
            self.report.step_factors[step] = factor
        return factor

    def _dynamic_factor(self, step: int, allowed: tuple[int, ...] | None = None) -> int:
        cfg = self.config
        candidates = tuple(k for k in cfg.candidate_factors if allowed is None or k in allowed)
        n = max(self.total_steps, 1)
        if step < cfg.warmup_steps or not (cfg.start_percent <= step / n < cfg.end_percent):
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
        factor, scores = choose_factor(d3, self.binding.native_patch, candidates, cfg.tau, cfg.rho)
        if step < self.total_steps:
            self.report.step_scores[step] = scores
        return factor

    # -- accounting --------------------------------------------------------------------
    def account(self, x: torch.Tensor, text_tokens: int, factor: int) -> None:
        b = self.binding
        p = b.native_patch
        h, w = x.shape[-2:]
        frames = (x.shape[2] + b.temporal_patch - 1) // b.temporal_patch if x.ndim == 5 else 1
        native = frames * -(-h // p) * -(-w // p)
        used = frames * -(-h // (p * factor)) * -(-w // (p * factor))
        batch = x.shape[0]
        self.report.flops_native += batch * b.step_flops(native, text_tokens)
        self.report.flops_used += batch * b.step_flops(used, text_tokens)
        self.report.calls[factor] += 1

    def note(self, text: str) -> None:
        if text not in self.report.notes:
            self.report.notes.append(text)

    def fallback(self, reason: str) -> None:
        self.report.fallbacks[reason] += 1

    def release(self) -> None:
        """Drop this run's tensors (graphs stay with the model, see graph_replay.cache_for)."""
        self._trajectory.clear()
        self.sampler_input = None
        self.graphs = None
