"""Settings of the Token Merge node, validated once, before any sampling.

Plain data, no ComfyUI imports. Field names are the node's input names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ...kernels.merge_pattern import MAX_RATIO, VIDEO_MODES, check_settings
from ...kernels.merge_pattern import ORDERS as TRAINING_FREE_ORDERS

ORDERS = TRAINING_FREE_ORDERS + ("learned",)  # learned: the pattern of a Load Merge Pattern node (learned_pattern.py)

UNMERGE_MODES = ("velocity", "renoise", "sigma", "residual", "copy")  # as runtime/merge_path.py (ideas import no runtime at config level)

log = logging.getLogger("elastic_tokens")


@dataclass(frozen=True)
class TokenMergeConfig:
    """Everything the node's inputs set; see the node's tooltips for meaning."""

    ratio: float = 0.5                  # share of image tokens merged away, 0..0.75
    order: str = "spread"               # which regions merge first (kernels/merge_pattern.py), or "learned"
    video_mode: str = "within_frames"   # within_frames | across_frames | both
    start_percent: float = 0.0          # sampling percent (ComfyUI's percent_to_sigma) where merging starts
    end_percent: float = 0.8            # ... and ends (the last steps add the fine detail)
    proportional_attention: bool = True
    unmerge: str = "velocity"           # velocity | renoise | residual | copy (runtime/merge_path.py)

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
            raise ValueError(f"Token Merge: ratio must be a number in [0, {MAX_RATIO}], got {self.ratio!r}")
        if self.order not in ORDERS:
            raise ValueError(f"Token Merge: order must be one of {ORDERS}, got {self.order!r}")
        check_settings(float(self.ratio), "spread" if self.order == "learned" else self.order, self.video_mode)
        if self.unmerge not in UNMERGE_MODES:
            raise ValueError(f"Token Merge: unmerge must be one of {UNMERGE_MODES}, got {self.unmerge!r}")
        for name in ("start_percent", "end_percent"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"Token Merge: {name} must be in [0, 1], got {value!r}")
        if self.ratio > 0 and self.empty_window:
            log.warning(f"Elastic Tokens: Token Merge window is empty (start_percent {self.start_percent:g} >= "
                        f"end_percent {self.end_percent:g}): no step is merged, the node has no effect")

    @property
    def empty_window(self) -> bool:
        return self.start_percent >= self.end_percent

    @property
    def never_merges(self) -> bool:
        """Ratio 0 or an empty window: the node is a no-op (the plain model's output, bit for bit)."""
        return self.ratio <= 0.0 or self.empty_window


__all__ = ["TokenMergeConfig", "ORDERS", "VIDEO_MODES", "MAX_RATIO"]
