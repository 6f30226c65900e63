"""ComfyUI glue: V3 node classes, per-run state and chainable sampling wrappers."""
