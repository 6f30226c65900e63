"""The training command and what it needs: provider interface, ComfyUI start-up, self-distillation."""
