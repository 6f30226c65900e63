"""Settings of the Dynamic Patch Schedule node, validated once, before any sampling.

Kept free of ComfyUI imports: it is plain data plus the forced-schedule syntax (read by
:func:`parse_forced_schedule`, written by :func:`format_schedule`). Field names are the node's
input names (``max_patch`` as a factor: 2 or 4).
"""

from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass, field

from ...kernels.resize import DOWN_MODES, UP_MODES

FACTORS = (1, 2, 4)
MAX_REPEAT = 10000          # one part's repeat count, e.g. "2x10000"
MAX_FORCED_STEPS = 10000    # the whole schedule (steps past its end run native anyway)
log = logging.getLogger("elastic_tokens")
_TOKEN = re.compile(r"^\s*([124])\s*p?\s*(?:[x*]\s*(\d+))?\s*$", re.IGNORECASE)


def parse_forced_schedule(text: str) -> tuple[int, ...]:
    """Parse ``"1x6, 2x22"`` / ``"2p*10,p"`` into per-step coarsening factors (1, 2 or 4).

    ``1``/``p`` is the native patch, ``2``/``2p`` twice as large, ``4``/``4p`` four times.
    Empty text means no forced schedule. Each repeat count is at most ``MAX_REPEAT`` and the whole
    schedule at most ``MAX_FORCED_STEPS`` steps.
    """
    text = (text or "").strip()
    if not text:
        return ()
    parts: list[tuple[int, int]] = []
    total = 0
    for part in text.replace(";", ",").split(","):
        if not part.strip():
            continue
        m = _TOKEN.match(part if part.strip().lower() != "p" else "1")
        if not m:
            raise ValueError(
                f"forced_schedule: cannot read {part.strip()!r}. Use comma-separated patch sizes "
                f"1 (native), 2 or 4, each optionally repeated, e.g. '1x6, 2x22' or '4x5,2x10,1x5'.")
        count = int(m.group(2) or 1)
        if count < 1 or count > MAX_REPEAT:
            raise ValueError(f"forced_schedule: repeat count in {part.strip()!r} must be 1..{MAX_REPEAT}")
        parts.append((int(m.group(1)), count))
        total += count
        if total > MAX_FORCED_STEPS:  # stop reading here: the text may be huge
            raise ValueError(f"forced_schedule: more than {MAX_FORCED_STEPS} steps in all ({total} up to "
                             f"{part.strip()!r}); a forced schedule may have at most {MAX_FORCED_STEPS} steps "
                             f"(steps past its end run native).")
    steps = [k for k, count in parts for _ in range(count)]
    return tuple(steps)


def format_schedule(factors) -> str:
    """``[1, 1, 2, 2, 2]`` -> ``"1x2,2x3"``: per-step factors in the forced-schedule syntax
    (0 stands for a step that was never evaluated)."""
    return ",".join(f"{k}x{len(list(run))}" for k, run in itertools.groupby(factors))


@dataclass(frozen=True)
class PatchScheduleConfig:
    """Everything the node's sliders set; see the node's tooltips for meaning."""

    tau: float = 0.5
    rho: float = 0.4
    warmup_steps: int = 3
    start_percent: float = 0.0
    end_percent: float = 0.9
    max_patch: int = 4
    forced_schedule: str = ""
    coarse_embed: str = "area"
    coarse_deembed: str = "bilinear"
    cuda_graphs: bool = False
    forced: tuple[int, ...] = field(init=False, default=())

    def __post_init__(self):
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {self.tau}")
        if not 0.0 <= self.rho <= 1.0:
            raise ValueError(f"rho must be in [0, 1], got {self.rho}")
        if self.warmup_steps < 3:
            raise ValueError("warmup_steps must be at least 3: the criterion needs four latents")
        for name in ("start_percent", "end_percent"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_patch not in (2, 4):
            raise ValueError(f"max_patch must be 2 or 4 (2p or 4p), got {self.max_patch}")
        if self.coarse_embed not in DOWN_MODES:
            raise ValueError(f"coarse_embed must be one of {DOWN_MODES}, got {self.coarse_embed!r}")
        if self.coarse_deembed not in UP_MODES:
            raise ValueError(f"coarse_deembed must be one of {UP_MODES}, got {self.coarse_deembed!r}")
        object.__setattr__(self, "forced", parse_forced_schedule(self.forced_schedule))
        if self.empty_window and not self.forced:
            log.warning(f"Elastic Tokens: Dynamic Patch Schedule window is empty (start_percent "
                        f"{self.start_percent:g} >= end_percent {self.end_percent:g}): no step goes coarse, "
                        f"the node has no effect")

    @property
    def empty_window(self) -> bool:
        """start_percent >= end_percent: no step of the automatic schedule is inside the window
        (as ComfyUI's own start/end settings, an empty window means "no effect", not an error)."""
        return self.start_percent >= self.end_percent

    @property
    def candidate_factors(self) -> tuple[int, ...]:
        return tuple(k for k in FACTORS if 1 < k <= self.max_patch)

    @property
    def never_coarse(self) -> bool:
        """True when no step can leave the native patch size (the node is then a no-op)."""
        if self.forced:  # a forced schedule runs as written; the window is not applied to it
            return all(k == 1 for k in self.forced)
        return self.tau <= 0.0 or self.empty_window
