"""One token plan per step: planners, the per-run state and report, the one wrapper set, execution (docs/runtime.md)."""
