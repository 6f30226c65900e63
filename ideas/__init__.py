"""The pack's ideas, each a planner plus its learned parts (docs/runtime.md): patch/ (DDiT)."""
