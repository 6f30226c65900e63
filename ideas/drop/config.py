"""Settings of the Elastic Token Router node, validated once, before any sampling.

Plain data, no ComfyUI import. Field names are the node's input names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCORERS = ("ras", "context", "change", "learned")
FILLS = ("cache", "nearest")
MIN_BUDGET = 0.1


@dataclass(frozen=True)
class RouterConfig:
    """What the node's inputs set; the node's tooltips say what each means.

    * ``budget``: share of the image tokens computed on a routed step (0.1..1.0; 1.0 = the plain
      model, bit for bit: the router then makes no decision at all);
    * ``scorer``: ``context`` (DC-DiT context residual on the x0 estimate; the default, chosen
      by the quality benchmark: BENCHMARKS.md §14), ``ras`` (last update's std per token),
      ``change`` (change of the update) or ``learned`` (the logits of a trained router attached
      by the "Load Token Router" node; ideas/drop/router_net.py);
    * ``fill``: skipped tokens get their ``cache``-d output from their last computed step (per
      CFG branch) or copy the ``nearest`` computed token's;
    * ``start_percent`` / ``end_percent``: the sampling window (ComfyUI's percent_to_sigma, as
      EasyCache): steps outside run every token;
    * ``refresh_every``: every k-th step of the window computes every token (and renews the
      cache); 0 = only the first step of the window;
    * ``attend_skipped``: computed tokens also attend to the skipped tokens' cached keys/values
      (RAS; ideas/drop/attend.py): closer to the full step, more memory, less speed-up;
    * ``uncond_budget``: the unconditional CFG branch's share where it is lower than ``budget``
      (DC-DiT's "Lite-CFG": the negative prompt's prediction only steers, so it can afford
      fewer tokens); its kept set is a subset of the cond branch's. 1.0 = as ``budget``;
    * ``age_weight``: multiply each token's score by the age of its cached output (skipped k times
      in a row: k + 1), a stronger refresh pressure than the starvation term: a score is an error
      per step, and a stale output's error grows with its age. None = the default, on for every
      scorer (chosen by measurement, BENCHMARKS.md §9); False for the bare scores.
    """

    budget: float = 0.5
    scorer: str = "context"
    fill: str = "cache"
    start_percent: float = 0.2
    end_percent: float = 1.0
    refresh_every: int = 5
    starvation: float = 0.1
    attend_skipped: bool = True
    uncond_budget: float = 1.0
    age_weight: bool | None = None

    def __post_init__(self):
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) \
                or not MIN_BUDGET <= b <= 1.0:
            raise ValueError(f"Elastic Token Router: budget must be a share of image tokens between "
                             f"{MIN_BUDGET} and 1.0 (1.0 = every token, the plain model), got {b!r}")
        u = self.uncond_budget
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not math.isfinite(u) \
                or not MIN_BUDGET <= u <= 1.0:
            raise ValueError(f"Elastic Token Router: uncond_budget must be a share of image tokens between "
                             f"{MIN_BUDGET} and 1.0 (1.0 = the same as budget), got {u!r}")
        if self.scorer not in SCORERS:
            raise ValueError(f"Elastic Token Router: scorer must be one of {', '.join(SCORERS)}, "
                             f"got {self.scorer!r}")
        if self.fill not in FILLS:
            raise ValueError(f"Elastic Token Router: fill must be one of {', '.join(FILLS)}, got {self.fill!r}")
        for name in ("start_percent", "end_percent"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"Elastic Token Router: {name} must be in [0, 1], got {v!r}")
        k = self.refresh_every
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"Elastic Token Router: refresh_every must be a whole number of steps >= 0 "
                             f"(0 = no dense refresh after the first step), got {k!r}")
        if not isinstance(self.attend_skipped, bool):
            raise ValueError(f"Elastic Token Router: attend_skipped must be true or false, got {self.attend_skipped!r}")
        if self.age_weight is not None and not isinstance(self.age_weight, bool):
            raise ValueError(f"Elastic Token Router: age_weight must be true, false or None, got {self.age_weight!r}")
        if not 0.0 <= self.starvation <= 10.0:
            raise ValueError(f"Elastic Token Router: starvation rate must be in [0, 10], got {self.starvation}")

    @property
    def uncond_share(self) -> float:
        """The uncond branch's share of image tokens: the lower of the two budgets."""
        return min(self.budget, self.uncond_budget)

    @property
    def ages_scores(self) -> bool:
        """Scores are multiplied by the age of each token's cached output (see ``age_weight``)."""
        return True if self.age_weight is None else self.age_weight

    @property
    def never_routes(self) -> bool:
        """True when no step can skip a token (both budgets 1.0, or an empty window): a no-op."""
        return self.uncond_share >= 1.0 or self.start_percent >= self.end_percent
