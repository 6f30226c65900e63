"""Training states from the student's own sampling trajectories (DAgger-style rollouts).

Distillation on re-noised pool samples trains each coarse step on states the *teacher* would
visit. At sampling time some twenty coarse steps in a row move the latent off those states, and
the errors compound: on the image proxy a recipe with a lower distillation loss sampled worse
(BENCHMARKS.md §5). Rolling pool conditionings out through the forced schedule with the current
student (Euler, the provider's CFG) and training on the states it actually visits, against the
teacher's velocity there, aims at that drift. Used by training/distill.py with ``--schedule``
and ``--rollout-every``. On the image proxy, at equal training time, rollouts sampled no better
than plain distillation on the schedule's steps (BENCHMARKS.md §5); they cost 40-65% of the steps.
:func:`sample_through` is also the sampler of training/validation.py.
"""

from __future__ import annotations

import torch


class ReplayBuffer:
    """The most recent rollout states per coarse factor: latent, sigma and pool sample index.

    Kept where the caller puts them (the trainer: CPU memory, in the model's dtype; a FLUX.1-dev
    1024² latent is 0.5 MB in bf16, so 1,024 states are 0.5 GB)."""

    def __init__(self, keep: int):
        self.keep = keep
        self.x: dict[int, torch.Tensor] = {}
        self.sigma: dict[int, torch.Tensor] = {}
        self.sample: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return sum(len(s) for s in self.sigma.values())

    def add(self, factor: int, x: torch.Tensor, sigma: torch.Tensor, sample: torch.Tensor) -> None:
        if factor in self.x:
            x, sigma, sample = (torch.cat([self.x[factor], x]), torch.cat([self.sigma[factor], sigma]),
                                torch.cat([self.sample[factor], sample]))
        self.x[factor], self.sigma[factor], self.sample[factor] = x[-self.keep:], sigma[-self.keep:], sample[-self.keep:]

    def draw(self, factor: int, n: int, gen: torch.Generator):
        """``n`` random states of ``factor``: (latents, sigmas, pool sample indices)."""
        idx = torch.randint(len(self.sigma[factor]), (n,), generator=gen)
        return self.x[factor][idx], self.sigma[factor][idx], self.sample[factor][idx]


def shape_key(entry: dict) -> tuple:
    """What must match for conditioning entries to stack into one batch: names and per-sample shapes."""
    return tuple(sorted((k, tuple(v.shape[1:])) for k, v in entry.items()))


def cfg_entries(conds: list[list[dict]], cfg_scale: float, flag: str = "--rollout-every") -> int:
    """How many conditioning entries a rollout uses per sample: 2 (cond, uncond) with CFG, else 1.

    Rollouts (and validation, ``flag``) stack one entry of many samples, so each entry must have
    one shape across the pool.
    """
    entries = 2 if cfg_scale != 1.0 and all(len(c) >= 2 for c in conds) else 1
    for j in range(entries):
        shapes = {shape_key(c[j]) for c in conds}
        if len(shapes) > 1:
            raise ValueError(f"{flag} needs conditioning tensors of one shape across the pool "
                             f"(entry {j} has {len(shapes)}); train without {flag}")
    return entries


def stack_entries(stack, conds: list[list[dict]], samples: list[int], entries: int, device, dtype) -> list[dict]:
    """The conditioning of ``samples``, one stacked batch per entry (cond, then uncond)."""
    return [stack([conds[i][j] for i in samples], device, dtype) for j in range(entries)]


@torch.no_grad()
def sample_through(student, per_entry: list[dict], x: torch.Tensor, schedule: tuple[int, ...],
                   sigmas: torch.Tensor, cfg_scale: float, dtype, on_coarse=None) -> torch.Tensor:
    """Euler from ``x`` (at ``sigmas[0]``) through ``schedule``: the student at its coarse steps,
    the teacher at native ones (and past the schedule's end), CFG ``cfg_scale`` over the stacked
    conditioning ``per_entry`` (cond, uncond). ``on_coarse(factor, x, sigma)`` sees the state of
    every coarse step before it is taken. Returns the final latent (float32)."""
    x = x.float()
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        factor = schedule[i] if i < len(schedule) else 1
        sig = torch.full((x.shape[0],), s, device=x.device)
        if factor > 1 and on_coarse is not None:
            on_coarse(factor, x, sig)
        v = [(student(x.to(dtype), sig, c, factor) if factor > 1 else student.teacher(x.to(dtype), sig, c)).float()
             for c in per_entry]
        velocity = v[0] if len(v) == 1 else v[1] + cfg_scale * (v[0] - v[1])
        x = x + (s_next - s) * velocity
    return x


@torch.no_grad()
def rollout(student, stack, conds: list[list[dict]], samples: list[int], schedule: tuple[int, ...],
            sigmas: torch.Tensor, cfg_scale: float, entries: int, latent_shape, gen: torch.Generator, device, dtype):
    """Sample ``samples``' conditionings through ``schedule`` with the student at its coarse steps
    and the teacher at native ones (Euler, CFG ``cfg_scale``); return the states of the coarse
    steps as ``[(factor, x, sigma)]`` on the CPU, ``x`` in ``dtype``. ``stack(entries, device,
    dtype)`` batches conditionings."""
    per_entry = stack_entries(stack, conds, samples, entries, device, dtype)
    x = float(sigmas[0]) * torch.randn((len(samples), *latent_shape), generator=gen).to(device)
    states = []
    sample_through(student, per_entry, x, schedule, sigmas, cfg_scale, dtype,
                   on_coarse=lambda k, xs, sig: states.append((k, xs.to("cpu", dtype), sig.cpu())))
    return states
