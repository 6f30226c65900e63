"""Self-distillation of patch adapters: the model teaches itself to run at a coarse patch size.

Teacher: the frozen model at its native patch size. Student: the same weights evaluated at a
coarse patch size exactly as the sampling loop does it (runtime/coarse.py), plus the
adapter (embed/de-embed corrections, patch-size embedding, residual) and peft LoRA on the
feed-forward layers. Loss ``|| v_student - v_teacher ||^2`` on velocities.

Data needs nothing external: the model first generates a pool of its own samples (through
ComfyUI's sampler, with the provider's prompts); training inputs are those latents noised to the
sigmas of the sampling schedule where coarse steps can happen. The conditioning of every sample
(cond and uncond of CFG) is recorded from the model's real calls during generation, so whatever
ComfyUI feeds the model (T5/CLIP context, pooled vectors, guidance, ...) is what training sees.

With classifier-free guidance the sampler does not use either branch alone but
``v_u + s (v_c - v_u)``: a student error becomes ``e_u + s (e_c - e_u)``. Where the two branches'
errors are weakly correlated (on the image proxy at CFG 3: correlation 0.4-0.8 at sigma
0.99-0.89, where the guided error was 4-7.5x the per-branch one; bench/cfg_error.py), a
per-branch loss under-weights what moves the trajectory there. ``guided`` (``--guided W``) trains
on ``(1 - W) * per-branch MSE + W * MSE of the guided velocity``, each batch carrying both branches
of the same noisy latents. Measured on the image proxy it lowered the guided error at high noise
but raised it later, and did not improve FID (BENCHMARKS.md §5): it is off by default.

Runs on one device or on several through ``torchrun`` (DDP; NCCL on GPUs, gloo on CPU): every
process generates its own share of the pool, gradients of the adapter and LoRA are averaged.
Checkpoints (adapter, LoRA, optimiser, pool, and every process's batch RNG) make a run resumable
exactly; rank 0 writes the shared state.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..families import binding_for
from ..families.autograd_forward import training_forward
from ..families.call_args import bind_call
from ..ideas.patch.adapter_file import AdapterSpec, PatchAdapter, save_adapter
from ..ideas.patch.config import format_schedule
from ..runtime.coarse import coarse_velocity, timestep_per_sigma
from .rollouts import ReplayBuffer, cfg_entries, rollout, shape_key
from .validation import BestAdapter, TrajectoryValidator


@dataclass
class TrainConfig:
    factors: tuple[int, ...] = (2,)
    rank: int = 32
    alpha: float = 32.0
    steps: int = 1000
    minutes: float | None = None        # wall-clock budget (stops early, then exports)
    batch: int = 16                     # per process
    lr: float = 1e-3                    # adapter layers
    lora_lr: float = 2e-4
    warmup: int = 50
    lr_final: float = 1.0               # cosine decay to this fraction of the lrs by the end (1 = constant)
    grad_clip: float = 1.0
    pool: int = 256                     # generated samples (all processes together)
    gen_batch: int = 16
    skip_steps: int = 3                 # first schedule steps (never coarse) are not trained on
    schedule: tuple[int, ...] = ()      # a forced schedule (factor per step): train only its coarse
                                        # steps, each at its own factor (overrides skip_steps)
    step_weights: dict = field(default_factory=dict)  # {sampling step: weight}: draw those steps' sigmas
                                        # that much more often (1 for steps not named)
    rollout_every: int = 0              # every N steps, roll pool conditionings out through the
    rollout_batch: int = 16             # schedule with the current student (training/rollouts.py)
    rollout_share: float = 0.5          # and train this share of the batches on the visited states
    rollout_keep: int = 1024            # (the most recent ``rollout_keep`` states per factor)
    val_every: int = 0                  # every N steps, sample held-out noise through the schedule
    val_n: int = 32                     # (``val_schedule``, default ``schedule``) and keep the adapter
    val_schedule: tuple[int, ...] = ()  # whose samples land closest to the native ones (validation.py)
    guided: float = 0.0                 # weight of the CFG-guided velocity's error in the loss (0..1;
                                        # 0 = per-branch only); needs a provider with CFG != 1
    ema: float = 0.0                    # decay of an exponential moving average of the trainable
                                        # weights (0 = off); validation and the written adapter use it
    coarse_embed: str = "area"          # the node's coarse_embed / coarse_deembed (adapters written
    coarse_deembed: str = "bilinear"    # before 0.3 call them down / up in their metadata)
    seed: int = 0
    log_every: int = 25
    ckpt: str | None = None             # checkpoint directory
    ckpt_every_s: float = 120.0
    resume: bool = False

    def __post_init__(self):
        self.factors = tuple(sorted({int(k) for k in self.factors}))
        if not 0.0 <= self.lr_final <= 1.0:
            raise ValueError(f"lr_final is a fraction of the learning rate in [0, 1], got {self.lr_final}")
        if not self.factors or any(k not in (2, 4) for k in self.factors):
            raise ValueError(f"factors must be 2 and/or 4, got {self.factors}")
        if self.rank < 1:
            raise ValueError("rank must be >= 1")
        self.schedule = tuple(int(k) for k in self.schedule)
        self.val_schedule = tuple(int(k) for k in self.val_schedule)
        for what, schedule in (("the schedule", self.schedule), ("the validation schedule", self.val_schedule)):
            missing = sorted({k for k in schedule if k > 1} - set(self.factors))
            if missing:
                raise ValueError(f"{what} has {', '.join(f'{k}p' for k in missing)} steps but factors are "
                                 f"{self.factors}: train those factors too")
        if self.schedule and not any(k > 1 for k in self.schedule):
            raise ValueError("the schedule has no coarse step to train")
        if self.rollout_every and not self.schedule:
            raise ValueError("rollouts follow a forced schedule: give one with --schedule")
        self.step_weights = {int(k): float(w) for k, w in dict(self.step_weights).items()}
        if any(w <= 0 or k < 0 for k, w in self.step_weights.items()):
            raise ValueError(f"step_weights: steps >= 0 and weights > 0, got {self.step_weights}")
        if self.val_every < 0 or self.val_n < 1:
            raise ValueError(f"val_every must be >= 0 and val_n >= 1, got {self.val_every} and {self.val_n}")
        if self.val_every and not (self.val_schedule or self.schedule):
            raise ValueError("validation samples through a forced schedule: give one with --schedule or --val-schedule")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema is a decay in [0, 1), got {self.ema}")
        if not 0.0 <= self.guided <= 1.0:
            raise ValueError(f"guided is a weight in [0, 1], got {self.guided}")
        if not 0.0 <= self.rollout_share <= 1.0:
            raise ValueError(f"rollout_share is a fraction in [0, 1], got {self.rollout_share}")
        unused = sorted(set(self.factors) - set(self.schedule)) if self.schedule else []
        if unused:
            raise ValueError(f"the schedule never runs at {', '.join(f'{k}p' for k in unused)}: "
                             f"leave {'it' if len(unused) == 1 else 'them'} out of the factors")


# ----------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str | None = None) -> "Dist":
        """One process, or the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        want = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if want.startswith("cuda"):
            dev = torch.device("cuda", local if world > 1 else (torch.device(want).index or 0))
            torch.cuda.set_device(dev)
        else:
            dev = torch.device("cpu")
        if world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return cls(rank, world, local, dev)

    def all_mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t) / self.world

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()


# ----------------------------------------------------------------------------- the pool

_SKIP_ARGS = {"x", "timestep", "transformer_options", "kwargs"}


class ConditioningRecorder:
    """DIFFUSION_MODEL wrapper keeping the first call's conditioning arguments, split per sample.

    ComfyUI batches cond and uncond (``transformer_options["cond_or_uncond"]``, chunks of equal
    size). Each chunk's tensors are stored per sample; non-tensor conditioning (ControlNet,
    reference latent lists) is refused: training on it is not supported.
    """

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, executor, *args, **kwargs):
        bound = bind_call(executor, args, kwargs)
        if not self.calls:
            x = bound.arguments["x"]
            named = {k: v for k, v in bound.arguments.items() if k not in _SKIP_ARGS}
            named.update(bound.arguments.get("kwargs") or {})
            chunks = list((bound.arguments.get("transformer_options") or {}).get("cond_or_uncond") or [0])
            per = x.shape[0] // len(chunks)
            rec = {}
            for name, value in named.items():
                if value is None:
                    continue
                if name == "control" or not isinstance(value, torch.Tensor):
                    raise ValueError(f"adapter training does not support conditioning input '{name}' "
                                     f"({type(value).__name__}); use plain text (and image) conditioning")
                rec[name] = value.detach()
            self.calls.append({"chunks": chunks, "per": per, "tensors": rec, "batch": x.shape[0]})
        return executor(*args, **kwargs)

    def samples(self) -> list[dict]:
        """One dict of conditioning tensors (batch 1) per (sample, cond/uncond), cond first."""
        call = self.calls[0]
        out = {c: [] for c in call["chunks"]}
        for ci, c in enumerate(call["chunks"]):
            for i in range(call["per"]):
                row = ci * call["per"] + i
                out[c].append({k: (v[row:row + 1] if v.shape[0] == call["batch"] else v[:1]).cpu()
                               for k, v in call["tensors"].items()})
        return [entry for c in sorted(out) for entry in out[c]]


def generate_pool(provider, model_patcher, seeds: list[int], gen_batch: int, log) -> tuple[torch.Tensor, list[dict]]:
    """Sample the model on ``seeds`` (native, the provider's sampler settings).

    Returns the clean latents in model space (``process_latent_in`` of the sampler's output) and,
    per sample, its conditionings (cond, and uncond when CFG > 1)."""
    import comfy.patcher_extension as pe
    import comfy.sample

    latents, conds = [], []
    for start in range(0, len(seeds), gen_batch):
        batch = seeds[start:start + gen_batch]
        recorder = ConditioningRecorder()
        mp = model_patcher.clone()
        mp.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "elastic_tokens.train_recorder", recorder)
        positive, negative = provider.conditioning(batch)
        empty = provider.empty_latent(len(batch))
        noise = torch.cat([comfy.sample.prepare_noise(empty[:1], s) for s in batch])
        out = comfy.sample.sample(mp, noise, provider.steps, provider.cfg, provider.sampler, provider.scheduler,
                                  positive, negative, empty, seed=batch[0], disable_pbar=True)
        latents.append(model_patcher.model.process_latent_in(out.float()).cpu())
        per_sample = recorder.samples()
        n = len(batch)
        for i in range(n):
            conds.append([per_sample[j * n + i] for j in range(len(per_sample) // n)])
        log(f"generated {min(start + gen_batch, len(seeds))}/{len(seeds)} pool samples")
    return torch.cat(latents), conds


# ----------------------------------------------------------------------------- LoRA (peft)

def inject_lora(dm: nn.Module, targets: tuple[str, ...], factors, rank: int, alpha: float) -> list[nn.Parameter]:
    """peft LoRA adapters ``k2``/``k4`` on ``targets`` of the training copy of the model (fp32)."""
    from peft import LoraConfig, inject_adapter_in_model

    for k in factors:
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), bias="none")
        inject_adapter_in_model(config, dm, adapter_name=f"k{k}")
    params = []
    for name, p in dm.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            params.append(p)
    return params


def lora_layers(dm: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [m for m in dm.modules() if isinstance(m, LoraLayer)]


def set_lora(layers, params, factor: int | None) -> None:
    """Activate the LoRA of ``factor`` (None: none, the teacher). peft toggles requires_grad on
    these calls; every LoRA parameter stays trainable for the optimiser and DDP."""
    for layer in layers:
        if factor is None:
            layer.enable_adapters(False)
        else:
            layer.enable_adapters(True)
            layer.set_adapter(f"k{factor}")
    for p in params:
        p.requires_grad_(True)


def export_lora(dm: nn.Module, factors) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    out: dict[int, dict] = {}
    for name, module in dm.named_modules():
        for k in factors:
            a = getattr(module, "lora_A", {})
            if f"k{k}" in a:
                out.setdefault(k, {})[name] = (module.lora_A[f"k{k}"].weight.detach().float().cpu(),
                                               module.lora_B[f"k{k}"].weight.detach().float().cpu())
    return out


# ----------------------------------------------------------------------------- the student

class Student(nn.Module):
    """The trainable part (adapter + LoRA, inside ``dm``) behind one ``forward`` for DDP."""

    def __init__(self, dm, adapter: PatchAdapter, binding, forward_fn, layers, lora_params, cfg: TrainConfig,
                 t_per_sigma: float):
        super().__init__()
        self.dm = dm
        self.adapter = adapter
        self._fwd = forward_fn
        self._binding = binding
        self._layers = layers
        self._lora_params = lora_params
        self._cfg = cfg
        self._t_per_sigma = t_per_sigma

    def teacher(self, x, sigma, cond: dict):
        """The frozen native model's velocity (LoRA switched off): the distillation target."""
        set_lora(self._layers, self._lora_params, None)
        return self._fwd(x, sigma * self._t_per_sigma, transformer_options={}, **cond)

    def lora_weights(self) -> dict:
        """The trained LoRA of each factor as the adapter file stores it (LoRA switched off after)."""
        set_lora(self._layers, self._lora_params, None)
        return export_lora(self.dm, self._cfg.factors)

    def forward(self, x, sigma, cond: dict, factor: int):
        set_lora(self._layers, self._lora_params, factor)

        def call(xs, ts, opts):
            return self._fwd(xs, ts, transformer_options=opts, **cond)
        # timesteps stay float32, as ComfyUI's BaseModel.apply_model passes them
        return coarse_velocity(call, x, sigma, torch.float32, factor, self._binding, self._t_per_sigma, {},
                               coarse_embed=self._cfg.coarse_embed, coarse_deembed=self._cfg.coarse_deembed,
                               part=self.adapter.part(factor))


# ----------------------------------------------------------------------------- checkpoints

def _save_ckpt(path: Path, dist: Dist, trainable: dict, optim, step: int, gen: torch.Generator,
               extra: dict) -> None:
    """Every process writes its batch RNG (``rng.rank<r>.pt``, so that each draws its own batches
    again after a resume), then rank 0 the shared state. Called by all processes together."""
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f"rng.rank{dist.rank}.pt.tmp"
    torch.save({"step": step, "rng": gen.get_state()}, tmp)
    tmp.replace(path / f"rng.rank{dist.rank}.pt")
    dist.barrier()
    if dist.main:
        tmp = path / "state.pt.tmp"
        torch.save({"trainable": {n: p.detach().cpu() for n, p in trainable.items()}, "optim": optim.state_dict(),
                    "step": step, "rng": gen.get_state(), "extra": extra}, tmp)
        tmp.replace(path / "state.pt")


def _save_pool(path: Path, rank: int, latents: torch.Tensor, conds: list) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {"latents": latents.contiguous()}
    for i, per in enumerate(conds):
        for j, c in enumerate(per):
            for k, v in c.items():
                tensors[f"cond.{i}.{j}.{k}"] = v.contiguous()
    save_file(tensors, str(path / f"pool.rank{rank}.safetensors"))


def _load_pool(path: Path, rank: int):
    from safetensors.torch import load_file

    f = path / f"pool.rank{rank}.safetensors"
    if not f.is_file():
        return None
    t = load_file(str(f))
    latents = t.pop("latents")
    conds: list[list[dict]] = [[] for _ in range(latents.shape[0])]
    for key in sorted(t):
        _, i, j, name = key.split(".", 3)
        i, j = int(i), int(j)
        while len(conds[i]) <= j:
            conds[i].append({})
        conds[i][j][name] = t[key]
    return latents, conds


# ----------------------------------------------------------------------------- training

def _stack(entries: list[dict], device, dtype) -> dict:
    out = {}
    for k in entries[0]:
        v = torch.cat([e[k] for e in entries]).to(device)
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def _batches_by_shape(conds: list[list[dict]]):
    """Group (sample, conditioning) pairs whose tensors stack (same shapes)."""
    groups: dict[tuple, list] = {}
    for i, per in enumerate(conds):
        for j, c in enumerate(per):
            groups.setdefault(shape_key(c), []).append((i, j))
    return list(groups.values())


def _interactive() -> bool:
    import sys

    return sys.stderr.isatty()


def _sampling_sigmas(provider, model_patcher) -> tuple[torch.Tensor, float]:
    """The provider's sampling schedule (``steps + 1`` sigmas) and the timestep per sigma."""
    import comfy.samplers

    sampling = model_patcher.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, provider.scheduler, provider.steps).float()
    return sigmas, timestep_per_sigma(sampling)


def _fits(schedule: tuple[int, ...], sigmas: torch.Tensor, what: str = "the schedule") -> None:
    """A forced schedule may be shorter than the sampling (later steps run native), not longer."""
    if len(schedule) > len(sigmas) - 1:
        raise ValueError(f"{what} has {len(schedule)} steps, the model samples {len(sigmas) - 1}")


def _train_steps(sigmas: torch.Tensor, cfg: TrainConfig) -> dict[int, list[int]]:
    """The sampling steps training covers, per coarse factor.

    Default: every step from ``skip_steps`` on, for each factor. With ``cfg.schedule``: only the
    steps that schedule runs coarse, each under its own factor.
    """
    steps = len(sigmas) - 1
    if cfg.schedule:  # steps past its end run native, as in the node
        _fits(cfg.schedule, sigmas)
        return {k: [i for i, f in enumerate(cfg.schedule) if f == k] for k in cfg.factors if k in cfg.schedule}
    covered = list(range(cfg.skip_steps, steps))
    if not covered:
        raise ValueError(f"skip_steps={cfg.skip_steps} leaves no steps of the {steps}-step schedule")
    return {k: covered for k in cfg.factors}


def _train_sigmas(sigmas: torch.Tensor, cfg: TrainConfig) -> dict[int, torch.Tensor]:
    """The sigmas of :func:`_train_steps`, per coarse factor."""
    return {k: sigmas[idx] for k, idx in _train_steps(sigmas, cfg).items()}


def _train_weights(sigmas: torch.Tensor, cfg: TrainConfig) -> dict[int, torch.Tensor]:
    """Per coarse factor, the drawing weight of each of :func:`_train_sigmas`' sigmas (empty
    without ``cfg.step_weights``: uniform). Weighted steps must be steps that training covers."""
    if not cfg.step_weights:
        return {}
    covered = _train_steps(sigmas, cfg)
    outside = sorted(set(cfg.step_weights) - {i for idx in covered.values() for i in idx})
    if outside:
        raise ValueError(f"step_weights names step(s) {outside} that training does not cover (coarse steps of "
                         f"the schedule, or steps {cfg.skip_steps}..{len(sigmas) - 2})")
    return {k: torch.tensor([cfg.step_weights.get(i, 1.0) for i in idx], dtype=torch.float64)
            for k, idx in covered.items()}


def _pool(provider, model_patcher, cfg: TrainConfig, dist: Dist, ckpt: Path | None, say):
    """This process's share of the generated pool: from the checkpoint on resume, else generated."""
    pool = _load_pool(ckpt, dist.rank) if (ckpt and cfg.resume) else None
    if pool is None:
        say(f"generating a pool of {cfg.pool} samples ({provider.steps} steps, cfg {provider.cfg}) "
            f"on {dist.world} process(es)")
        with torch.no_grad():
            pool = generate_pool(provider, model_patcher, list(range(dist.rank, cfg.pool, dist.world)),
                                 cfg.gen_batch, say)
        if ckpt:
            _save_pool(ckpt, dist.rank, *pool)
    return pool


def _build_student(model_patcher, binding, cfg: TrainConfig, device, t_per_sigma: float):
    """A zero-initialised adapter plus peft LoRA in the frozen model: (student, trainable parameters)."""
    spec = AdapterSpec.for_model(model_patcher, binding, cfg.factors, cfg.rank, cfg.alpha,
                                 {k: v for k, v in asdict(cfg).items() if k not in ("ckpt", "resume")})
    adapter = PatchAdapter(spec).to(device)
    dm = model_patcher.model.diffusion_model
    for p in dm.parameters():
        p.requires_grad_(False)
    lora_params = inject_lora(dm, binding.feed_forward, cfg.factors, cfg.rank, cfg.alpha)
    dm.to(device)
    student = Student(dm, adapter, binding, training_forward(dm), lora_layers(dm), lora_params, cfg, t_per_sigma)
    trainable = {n: p for n, p in student.named_parameters() if "lora_" in n or n.startswith("adapter.")}
    for p in trainable.values():
        p.requires_grad_(True)
    return student, trainable


def _trained_with(spec: AdapterSpec, name: str, old_name: str, default: str) -> str:
    """A training setting from an adapter's metadata (older files used ``old_name``)."""
    return spec.training.get(name, spec.training.get(old_name, default))


def student_with(model_patcher, adapter: PatchAdapter, device) -> Student:
    """The trainer's student holding ``adapter``'s tensors: the coarse velocities training optimised,
    for measurements outside training (bench/cfg_error.py). peft LoRA is injected into
    ``model_patcher``'s diffusion model: pass a model loaded for this purpose."""
    spec = adapter.spec
    t_per_sigma = timestep_per_sigma(model_patcher.get_model_object("model_sampling"))
    cfg = TrainConfig(factors=spec.factors, rank=spec.rank, alpha=spec.alpha,
                      coarse_embed=_trained_with(spec, "coarse_embed", "down", "area"),
                      coarse_deembed=_trained_with(spec, "coarse_deembed", "up", "bilinear"))
    student, _ = _build_student(model_patcher, binding_for(model_patcher), cfg, device, t_per_sigma)
    with torch.no_grad():
        student.adapter.coarse.load_state_dict(adapter.coarse.state_dict())
        for k, layers in adapter.lora.items():
            for name, (a, b) in layers.items():
                module = student.dm.get_submodule(name)
                module.lora_A[f"k{k}"].weight.copy_(a)
                module.lora_B[f"k{k}"].weight.copy_(b)
    return student.eval()


def _optimizer(trainable: dict, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW([
        {"params": [p for n, p in trainable.items() if n.startswith("adapter.")], "lr": cfg.lr},
        {"params": [p for n, p in trainable.items() if "lora_" in n], "lr": cfg.lora_lr}],
        betas=(0.9, 0.99), weight_decay=0.0)


def _lr_factor(cfg: TrainConfig, step: int, done: float) -> float:
    """Linear warm-up, then cosine decay over the run (``done``: 0..1 of steps or of the time budget)."""
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(max(done, 0.0), 1.0)))
    return min(1.0, (step + 1) / max(cfg.warmup, 1)) * (cfg.lr_final + (1.0 - cfg.lr_final) * cosine)


def _scheduled_factor(cfg: TrainConfig, gen: torch.Generator) -> int:
    """A coarse factor of ``cfg.schedule``, drawn with the weight of its number of steps."""
    coarse = [k for k in cfg.schedule if k > 1]
    return coarse[int(torch.randint(len(coarse), (1,), generator=gen))]


def _batch(latents, conds, groups, train_sigmas: dict, cfg: TrainConfig, gen: torch.Generator, device, dtype,
           weights: dict | None = None):
    """One training batch: pool samples sharing a conditioning shape, noised to random sigmas of
    the steps trained at one coarse factor (``weights``: per sigma, else uniform), and that factor.
    Draws from ``gen`` in a fixed order (exact resume); with a schedule the factor is drawn first,
    weighted by its number of steps."""
    factor = _scheduled_factor(cfg, gen) if cfg.schedule else None
    group = groups[int(torch.randint(len(groups), (1,), generator=gen))]
    entries = [group[i] for i in torch.randint(len(group), (cfg.batch,), generator=gen).tolist()]
    x0 = latents[[i for i, _ in entries]].to(device, torch.float32)
    if cfg.guided:  # both branches of each drawn sample: rows [cond of all, uncond of all]
        entries = [(i, j) for j in (0, 1) for i, _ in entries]
    cond = _stack([conds[i][j] for i, j in entries], device, dtype)
    key = factor if factor is not None else cfg.factors[0]
    pool_sigmas = train_sigmas[key]
    if weights:
        pick = torch.multinomial(weights[key], cfg.batch, replacement=True, generator=gen)
    else:
        pick = torch.randint(len(pool_sigmas), (cfg.batch,), generator=gen)
    sigma = pool_sigmas[pick].to(device)
    eps = torch.randn(x0.shape, generator=gen).to(device)
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    x_t = ((1.0 - s) * x0 + s * eps).to(dtype)
    if cfg.guided:
        x_t, sigma = x_t.repeat(2, *([1] * (x_t.ndim - 1))), sigma.repeat(2)
    if factor is None:
        factor = cfg.factors[int(torch.randint(len(cfg.factors), (1,), generator=gen))]
    return x_t, sigma, cond, factor


def _loss(v_student: torch.Tensor, v_teacher: torch.Tensor, guided: float, cfg_scale: float) -> torch.Tensor:
    """Per-branch velocity MSE, blended with the MSE of the CFG-guided velocity ``v_u + s (v_c - v_u)``
    (rows: the first half cond, the second uncond, as :func:`_batch` draws them when ``guided``)."""
    branch = F.mse_loss(v_student, v_teacher)
    if not guided:
        return branch

    def guide(v):
        c, u = v.chunk(2)
        return u + cfg_scale * (c - u)
    return (1.0 - guided) * branch + guided * F.mse_loss(guide(v_student), guide(v_teacher))


def _check_guided(conds: list[list[dict]], cfg_scale: float) -> None:
    """``--guided`` needs CFG and a cond and an uncond per sample that stack into one batch."""
    if cfg_entries(conds, cfg_scale, flag="--guided") != 2:
        raise ValueError("--guided trains on the CFG-guided velocity, but this model samples without CFG "
                         f"(cfg {cfg_scale:g}): train without --guided")
    if any(shape_key(c[0]) != shape_key(c[1]) for c in conds):
        raise ValueError("--guided stacks each sample's cond and uncond in one batch, but their conditioning "
                         "tensors differ in shape here; train without --guided")


class WeightAverage:
    """Exponential moving average of the trainable tensors (float32 copies on their device).

    With a constant learning rate the adapter keeps moving around its optimum (on the image proxy
    the trajectory error of consecutive checkpoints 250 steps apart varied by 30%); the average
    sits nearer the middle. The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` so early
    averages are not dominated by the zero initialisation."""

    def __init__(self, trainable: dict, decay: float, state: dict | None = None):
        self.decay = decay
        self.updates = int((state or {}).get("updates", 0))
        saved = (state or {}).get("tensors") or {}
        self.tensors = {n: (saved[n].to(p.device, torch.float32) if n in saved else p.detach().float().clone())
                        for n, p in trainable.items()}

    @torch.no_grad()
    def update(self, trainable: dict) -> None:
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for n, p in trainable.items():
            self.tensors[n].lerp_(p.detach().float(), 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, trainable: dict) -> None:
        for n, p in trainable.items():
            p.copy_(self.tensors[n])

    @contextlib.contextmanager
    def swapped_in(self, trainable: dict):
        """The averaged weights in place of the trained ones while the context is open."""
        saved = {n: p.detach().clone() for n, p in trainable.items()}
        self.copy_to(trainable)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in trainable.items():
                    p.copy_(saved[n])

    def to_checkpoint(self) -> dict:
        return {"updates": self.updates, "tensors": {n: t.cpu() for n, t in self.tensors.items()}}


def _replay_batch(buffer: ReplayBuffer, conds, entries: int, cfg: TrainConfig, gen: torch.Generator, device, dtype):
    """One training batch of rollout states: a factor drawn as in :func:`_batch`, states of it,
    and one conditioning entry (cond or uncond) of their samples."""
    factor = _scheduled_factor(cfg, gen)
    x, sigma, samples = buffer.draw(factor, cfg.batch, gen)
    if cfg.guided:  # both branches, as in :func:`_batch`
        cond = _stack([conds[i][j] for j in (0, 1) for i in samples.tolist()], device, dtype)
        return x.repeat(2, *([1] * (x.ndim - 1))).to(device, dtype), sigma.repeat(2).to(device), cond, factor
    j = int(torch.randint(entries, (1,), generator=gen))
    cond = _stack([conds[i][j] for i in samples.tolist()], device, dtype)
    return x.to(device, dtype), sigma.to(device), cond, factor


def _resume(ckpt: Path | None, cfg: TrainConfig, dist: Dist, trainable: dict, optim, gen: torch.Generator,
            say) -> tuple[int, dict]:
    """Restore trainable tensors, optimiser and this process's batch RNG from ``ckpt``: the step to
    continue from (0: fresh) and the checkpoint's ``extra`` (the validation record)."""
    if not (ckpt and cfg.resume and (ckpt / "state.pt").is_file()):
        return 0, {}
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    with torch.no_grad():
        for n, t in state["trainable"].items():
            trainable[n].copy_(t)
    optim.load_state_dict(state["optim"])
    own = ckpt / f"rng.rank{dist.rank}.pt"
    saved = torch.load(own, weights_only=True) if own.is_file() else None
    if saved is not None and int(saved["step"]) == int(state["step"]):
        gen.set_state(saved["rng"])
    elif dist.main:
        gen.set_state(state["rng"])
    if dist.world > 1 and dist.all_mean(float(saved is None or int(saved["step"]) != int(state["step"]))) > 0:
        say("the checkpoint lacks some processes' random states (written by an older version or another "
            "number of processes): those processes continue with fresh batch draws")
    say(f"resumed from {ckpt} at step {int(state['step'])}")
    return int(state["step"]), state.get("extra") or {}


def _validator(student, provider, conds, latent_shape, sigmas, cfg: TrainConfig, dist: Dist, dtype, say):
    """The trajectory validator of ``cfg`` on the main process (None when validation is off):
    the first ``val_n`` pool conditionings of this process, fresh noise, chunks of ``gen_batch``."""
    if not (cfg.val_every and dist.main):
        return None
    schedule = cfg.val_schedule or cfg.schedule
    _fits(schedule, sigmas, "the validation schedule")
    samples = list(range(min(cfg.val_n, len(conds))))
    entries = cfg_entries([conds[i] for i in samples], float(provider.cfg), flag="--val-every")
    t0 = time.time()
    validator = TrajectoryValidator(student, _stack, conds, samples, schedule, sigmas, float(provider.cfg), entries,
                                    latent_shape, seed=1_000_003 + cfg.seed, batch=cfg.gen_batch,
                                    device=dist.device, dtype=dtype)
    say(f"validation: every {cfg.val_every} steps, {len(samples)} held-out noises through {format_schedule(schedule)} "
        f"against native sampling (references took {time.time() - t0:.1f} s); the best adapter is kept")
    return validator


def _progress_bar(dist: Dist, cfg: TrainConfig, step: int):
    if not (dist.main and _interactive()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.steps, initial=step, desc="adapter", unit="step", dynamic_ncols=True)


def train(provider, cfg: TrainConfig, out_path: str | Path, *, device: str | None = None, log=print) -> dict:
    """Train an adapter for ``provider``'s model and write it to ``out_path`` (rank 0).

    ``provider`` is a bench/bench_quality.py model provider (``setup``, ``load``, ``empty_latent``,
    ``conditioning``, ``steps``/``cfg``/``sampler``/``scheduler``). Returns a summary dict.
    """
    import comfy.model_management

    t_start = time.time()
    dist = Dist.from_env(device)
    say = log if dist.main else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed + dist.rank)
    model_patcher = provider.load()
    if dist.device.type == "cuda":
        comfy.model_management.load_models_gpu([model_patcher], force_full_load=True)
    binding = binding_for(model_patcher)
    dtype = model_patcher.model.get_dtype() if dist.device.type == "cuda" else torch.float32
    sigmas, t_per_sigma = _sampling_sigmas(provider, model_patcher)
    train_sigmas = _train_sigmas(sigmas, cfg)
    train_weights = _train_weights(sigmas, cfg)

    ckpt = Path(cfg.ckpt) if cfg.ckpt else None
    latents, conds = _pool(provider, model_patcher, cfg, dist, ckpt, say)
    groups = _batches_by_shape(conds)
    t_pool = time.time() - t_start

    student, trainable = _build_student(model_patcher, binding, cfg, dist.device, t_per_sigma)
    optim = _optimizer(trainable, cfg)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + dist.rank)
    step, extra = _resume(ckpt, cfg, dist, trainable, optim, gen, say)  # 0: the first loss is training-free
    start_step = step
    model = student
    if dist.world > 1:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
            find_unused_parameters=len(cfg.factors) > 1, broadcast_buffers=False)
    base_lrs = [g["lr"] for g in optim.param_groups]

    cfg_scale = float(provider.cfg)
    if cfg.guided:
        _check_guided(conds, cfg_scale)
        say(f"loss: {1 - cfg.guided:g} x per-branch MSE + {cfg.guided:g} x MSE of the guided velocity "
            f"(cfg {cfg_scale:g}); {cfg.batch} samples x 2 branches per batch")
    buffer = ReplayBuffer(cfg.rollout_keep) if cfg.rollout_every else None
    if buffer is not None:
        entries = cfg_entries(conds, float(provider.cfg))
        say(f"rollouts: every {cfg.rollout_every} steps, {cfg.rollout_batch} samples through the schedule "
            f"(cfg {provider.cfg}); {100 * cfg.rollout_share:.0f}% of batches from their states"
            + (" (the replay buffer starts empty after a resume)" if start_step else ""))

    validator = _validator(student, provider, conds, latents.shape[1:], sigmas, cfg, dist, dtype, say)
    best = BestAdapter.from_checkpoint(extra.get("val"))
    average = WeightAverage(trainable, cfg.ema, extra.get("ema")) if cfg.ema else None
    if average is not None:
        say(f"weights: exponential moving average, decay {cfg.ema:g}; validated and written instead of the "
            "last weights")

    def evaluated():  # what validation sees and the file gets: the average, when there is one
        return average.swapped_in(trainable) if average is not None else contextlib.nullcontext()

    def validate():
        if validator is None or best.seen(step):
            return
        with evaluated():
            mse = validator.error(student)
            improved = best.offer(step, mse, trainable)
        label = " (training-free)" if step == 0 else (" (best so far)" if improved else "")
        say(f"validation at step {step}: final-latent MSE {mse:.5f} to native sampling{label}; "
            f"best {best.mse:.5f} at step {best.step}")

    def checkpoint():
        records = {"val": best.to_checkpoint()} if validator else {}
        if average is not None:
            records["ema"] = average.to_checkpoint()
        _save_ckpt(ckpt, dist, trainable, optim, step, gen, records)

    history, first_loss, last_ckpt = [], None, time.time()
    deadline = t_start + 60.0 * cfg.minutes if cfg.minutes else None
    progress = _progress_bar(dist, cfg, step)
    t_loop = time.time()
    steps_this_run = samples_seen = 0
    while step < cfg.steps:
        done = step / cfg.steps
        if deadline is not None:  # one value for all processes: the same lr everywhere
            done = max(done, dist.all_mean((time.time() - t_start) / (deadline - t_start)))
            if done >= 1.0:
                say(f"time budget of {cfg.minutes} min reached at step {step}")
                break
        if cfg.val_every and step % cfg.val_every == 0:
            validate()
        if buffer is not None and step % cfg.rollout_every == 0:
            picks = torch.randint(len(conds), (cfg.rollout_batch,), generator=gen).tolist()
            for k, x, s in rollout(student, _stack, conds, picks, cfg.schedule, sigmas, float(provider.cfg),
                                   entries, latents.shape[1:], gen, dist.device, dtype):
                buffer.add(k, x, s, torch.tensor(picks))
        if buffer is not None and len(buffer) and float(torch.rand(1, generator=gen)) < cfg.rollout_share:
            x_t, sigma, cond, factor = _replay_batch(buffer, conds, entries, cfg, gen, dist.device, dtype)
        else:
            x_t, sigma, cond, factor = _batch(latents, conds, groups, train_sigmas, cfg, gen, dist.device, dtype,
                                              train_weights)
        with torch.no_grad():
            v_teacher = student.teacher(x_t, sigma, cond).float()
        loss = _loss(model(x_t, sigma, cond, factor).float(), v_teacher, cfg.guided, cfg_scale)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(trainable.values()), cfg.grad_clip))
        for g, base in zip(optim.param_groups, base_lrs):
            g["lr"] = base * _lr_factor(cfg, step, done)
        optim.step()
        if average is not None:
            average.update(trainable)
        step += 1
        steps_this_run += 1
        samples_seen += cfg.batch * dist.world
        value = dist.all_mean(float(loss.detach()))
        if first_loss is None:
            first_loss = value
        history.append(value)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{value:.4f}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            recent = history[-cfg.log_every:]
            say(f"step {step}: loss {sum(recent) / len(recent):.5f} (first {first_loss:.5f}), grad {grad_norm:.3f}")
        if ckpt and dist.all_mean(float(time.time() - last_ckpt > cfg.ckpt_every_s)) > 0:  # all or none
            checkpoint()
            last_ckpt = time.time()
    if progress is not None:
        progress.close()
    loop_s = time.time() - t_loop
    validate()  # the last step, unless just done
    if ckpt:  # the last state, to resume from; the export below may be an earlier one
        checkpoint()
    if validator is not None and best.state is not None:  # the weights validation saw at its best step
        best.restore(trainable)
        if best.step != step:
            say(f"kept the adapter of step {best.step}: validation MSE {best.mse:.5f} "
                f"(last step {step}: {best.history[-1][1]:.5f})")
    elif average is not None:
        average.copy_to(trainable)

    adapter = student.adapter
    adapter.lora = student.lora_weights()
    tail = history[-max(1, min(len(history), cfg.log_every)):]
    summary = {
        "steps": step, "steps_this_run": steps_this_run, "world_size": dist.world,
        "samples_per_s": samples_seen / loop_s if loop_s > 0 else None,
        "first_loss": first_loss, "final_loss": sum(tail) / len(tail) if tail else None,
        "pool_s": t_pool, "train_s": loop_s, "total_s": time.time() - t_start,
        "peak_memory_gib": (torch.cuda.max_memory_allocated(dist.device) / 2**30
                            if dist.device.type == "cuda" else None),
        "adapter_parameters": adapter.parameter_count(), "factors": list(cfg.factors), "rank": cfg.rank,
        "family": binding.family, "device": str(dist.device),
    }
    if validator is not None:
        summary["validation"] = {"every": cfg.val_every, "n": len(validator.noise),
                                 "schedule": format_schedule(validator.schedule), "history": best.history,
                                 "best_step": best.step, "best_mse": best.mse}
        adapter.spec.training.update({"val_best_step": best.step, "val_mse": best.mse})
    adapter.spec.training.update({"final_loss": summary["final_loss"],
                                  ("first_loss" if start_step == 0 else "first_loss_after_resume"): first_loss,
                                  "steps_done": step, "world_size": dist.world})
    if dist.main:
        save_adapter(adapter, out_path)
        if first_loss is None:  # no step this run (resumed a finished run, or --minutes ran out first)
            result = f"no training step in this run ({step} steps done)"
        else:
            label = "training-free" if start_step == 0 else f"at step {start_step}, resumed"
            result = (f"loss {first_loss:.5f} ({label}) -> {summary['final_loss']:.5f} after {step} steps "
                      f"({summary['samples_per_s']:.1f} samples/s)")
        say(f"wrote {out_path}: {summary['adapter_parameters'] / 1e6:.2f}M parameters; {result}")
    dist.barrier()
    return summary
