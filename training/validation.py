"""Trajectory validation: how far the student's samples land from the model's own.

The distillation loss scores one step on re-noised pool samples. Sampling chains some twenty
coarse steps, and on the image proxy the loss ranked five adapters almost in reverse of FID (the
lowest-loss adapter sampled worst), while the LPIPS of their images to the full model's images,
an error over the whole trajectory, ranked them exactly as FID did (BENCHMARKS.md §5). So the
trainer measures that directly: fixed held-out noises with pool conditionings are sampled through
the schedule (student at coarse steps, teacher at native ones, the provider's CFG) and compared
with the teacher's native samples from the same noise, and the trainer keeps the adapter with the
smallest error, not the last one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .rollouts import sample_through, stack_entries


class TrajectoryValidator:
    """Final-latent MSE of ``schedule`` sampled with the student against native sampling.

    ``samples`` index the pool's conditionings (``stack`` batches them as in training); the noise
    is drawn once from ``seed``, apart from the pool's, and the native references are sampled
    once, at construction. Everything runs in chunks of ``batch`` samples on ``device``.
    """

    def __init__(self, student, stack, conds: list[list[dict]], samples: list[int], schedule: tuple[int, ...],
                 sigmas: torch.Tensor, cfg_scale: float, entries: int, latent_shape, *, seed: int, batch: int,
                 device, dtype):
        self.schedule = tuple(schedule)
        self._sigmas, self._cfg, self._dtype, self._device = sigmas, float(cfg_scale), dtype, device
        self._chunks = []
        for start in range(0, len(samples), max(1, batch)):
            part = samples[start:start + max(1, batch)]
            self._chunks.append((len(part), stack_entries(stack, conds, part, entries, device, dtype)))
        self.noise = torch.randn((len(samples), *latent_shape), generator=torch.Generator().manual_seed(seed))
        self.reference = self._sample(student, ())

    def _sample(self, student, schedule) -> torch.Tensor:
        out, start = [], 0
        for n, per_entry in self._chunks:
            x = float(self._sigmas[0]) * self.noise[start:start + n].to(self._device)
            out.append(sample_through(student, per_entry, x, schedule, self._sigmas, self._cfg, self._dtype).cpu())
            start += n
        return torch.cat(out)

    def error(self, student) -> float:
        """Mean squared difference of the final latents (model space) to the native samples."""
        return float(((self._sample(student, self.schedule) - self.reference) ** 2).mean())


@dataclass
class BestAdapter:
    """The validation history and CPU copies of the trainable tensors at the best step so far."""

    history: list = field(default_factory=list)  # [[step, mse], ...]
    step: int | None = None
    mse: float = math.inf
    state: dict | None = None

    def offer(self, step: int, mse: float, trainable: dict) -> bool:
        """Record ``mse`` at ``step``; keep ``trainable`` if it is the best so far (True)."""
        self.history.append([step, mse])
        if mse < self.mse:
            self.step, self.mse = step, mse
            self.state = {n: p.detach().cpu().clone() for n, p in trainable.items()}
            return True
        return False

    def seen(self, step: int) -> bool:
        return bool(self.history) and self.history[-1][0] == step

    def restore(self, trainable: dict) -> None:
        with torch.no_grad():
            for n, t in self.state.items():
                trainable[n].copy_(t)

    def to_checkpoint(self) -> dict:
        return {"history": self.history, "step": self.step, "mse": self.mse, "state": self.state}

    @classmethod
    def from_checkpoint(cls, saved: dict | None) -> "BestAdapter":
        return cls(**saved) if saved else cls()
