"""What one sampling run did: the run report, its log line, and the public way to read it.

The runtime keeps the latest report on the MODEL it sampled with; :func:`last_run_report` is how
anything outside the runtime (benchmarks, the proxy nodes, a user's script) reads it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field

STACK_KEY = "elastic_tokens_planners"   # transformer_options key of the stacked planners


def factor_name(factor: int) -> str:
    return "p" if factor == 1 else f"{factor}p"


@dataclass
class RunReport:
    """What one sampling run did."""

    total_steps: int
    planners: list[str] = field(default_factory=list)        # the stacked nodes, in planning order
    step_factors: list[int] = field(default_factory=list)    # per step; 0 = step never evaluated
    step_tokens: list[int] = field(default_factory=list)     # image tokens per sample through the blocks
    step_grid_tokens: list[int] = field(default_factory=list)  # image tokens of the step's grid (at its factor)
    step_scores: list[dict] = field(default_factory=list)    # what planners measured, where they did
    calls: Counter = field(default_factory=Counter)          # model calls per factor
    fallbacks: Counter = field(default_factory=Counter)      # calls run native instead, by reason
    flops_native: float = 0.0
    flops_used: float = 0.0
    seconds: float = 0.0
    graph_replays: int = 0                                    # coarse calls replayed as CUDA graphs
    adapter_calls: int = 0                                    # coarse calls run with a patch adapter
    notes: list[str] = field(default_factory=list)            # one-off remarks for the log
    step_merged: list[int] = field(default_factory=list)      # image tokens merged away per step (0: none)

    @property
    def saved_fraction(self) -> float:
        return 1.0 - self.flops_used / self.flops_native if self.flops_native else 0.0

    @property
    def estimated_speedup(self) -> float:
        return self.flops_native / self.flops_used if self.flops_used else 1.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(calls=dict(self.calls), fallbacks=dict(self.fallbacks),
                   saved_fraction=self.saved_fraction, estimated_speedup=self.estimated_speedup)
        return out

    def summary(self) -> str:
        counts = Counter(k for k in self.step_factors if k)
        parts = ", ".join(f"{counts.get(k, 0)} at {factor_name(k)}" for k in (1, 2, 4))
        name = " + ".join(dict.fromkeys(self.planners)) or "Elastic Tokens"
        text = (f"{name}: {sum(counts.values())}/{self.total_steps} steps ({parts}); "
                f"{100 * self.saved_fraction:.0f}% of transformer FLOPs skipped, "
                f"~{self.estimated_speedup:.2f}x estimated")
        grid = sum(self.step_grid_tokens)
        if grid and sum(self.step_tokens) != grid:
            text += f"; {100 * (1 - sum(self.step_tokens) / grid):.0f}% of image tokens skipped or merged"
        if self.seconds:
            text += f"; sampling took {self.seconds:.2f} s"
        merged = [i for i, m in enumerate(self.step_merged) if m]
        if merged:
            share = sum(self.step_merged[i] for i in merged) / max(sum(self.step_grid_tokens[i] for i in merged), 1)
            text += f"; {100 * share:.0f}% of image tokens merged away on {len(merged)}/{self.total_steps} steps"
        if self.fallbacks:
            reasons = ", ".join(f"{n}x {r}" for r, n in self.fallbacks.items())
            text += f"; ran native instead: {reasons}"
        if self.adapter_calls:
            text += f"; {self.adapter_calls} coarse calls with the patch adapter"
        if self.graph_replays:
            text += f"; {self.graph_replays} coarse calls replayed as CUDA graphs"
        for note in self.notes:
            text += f"; {note}"
        return text


_SUMMARY = re.compile(r"(?P<name>[^:]+): (?P<done>\d+)/(?P<total>\d+) steps \((?P<parts>[^)]*)\); "
                      r"(?P<skipped>[\d.]+)% of transformer FLOPs skipped, ~(?P<est>[\d.]+)x estimated"
                      r"(?:; (?P<tokens>[\d.]+)% of image tokens skipped or merged)?"
                      r"(?:; sampling took (?P<secs>[\d.]+) s)?")


def parse_summary(line: str) -> dict:
    """The numbers of a :meth:`RunReport.summary` line, for a process that only sees the log (a
    ComfyUI server's); ``{}`` if ``line`` is not one. In-process, use :func:`last_run_report`."""
    m = _SUMMARY.search(line)
    if not m:
        return {}
    return {"nodes": m["name"].strip(), "steps": f"{m['done']}/{m['total']}", "parts": m["parts"],
            "flops_skipped_pct": float(m["skipped"]), "estimated_speedup": float(m["est"]),
            "tokens_skipped_pct": float(m["tokens"]) if m["tokens"] else 0.0,
            "sampling_s": float(m["secs"]) if m["secs"] else None}


def last_run_report(model) -> RunReport | None:
    """The report of the latest sampling run of ``model`` (a ModelPatcher that one of the pack's
    nodes returned, or its ``model_options``), or None if it has not sampled yet or carries none
    of the pack's nodes."""
    options = getattr(model, "model_options", model)
    stack = (options or {}).get("transformer_options", {}).get(STACK_KEY) if isinstance(options, dict) else None
    return getattr(stack, "last_report", None)
