#!/usr/bin/env python3
"""Speed benchmark: full sampling runs through ComfyUI's real KSampler path.

One process, one device. For each model (FLUX.1-dev size: ComfyUI's Flux class, hidden 3072,
19 double + 38 single blocks, guidance embed, 11.9B params; Wan 2.1 T2V 1.3B size: dim 1536,
ffn 8960, 30 layers, 12 heads, 1.42B params; bf16 random weights N(0, 0.02) created directly on
the GPU) it times complete ``nodes.common_ksampler`` runs under ``torch.inference_mode()`` (as
ComfyUI's executor does), text encoders and VAE excluded (random conditioning of the real
shapes), with ``torch.cuda.synchronize()`` around each run, a warm-up run per variant, then
``--repeats`` timed runs (median reported). ComfyUI runs with ``--highvram`` so the model stays
on the GPU between runs. Results go to ``--out`` as bench_speed.json + bench_speed.md, written
after every variant (a run killed at its time limit still leaves them).

Workloads: Flux 1024x1024 (latent 1x16x128x128), context [1,512,4096] + pooled [1,768],
guidance 3.5, cfg 1.0, euler/simple, 28 steps. Wan 832x480x81 (latent 1x16x21x60x104),
context [1,512,4096] and a negative (CFG 6.0, batch 2), uni_pc/simple, 30 steps.

On the GPU machine (carry: [".whl"], made here by scripts/device_wheels.sh)::

    set -o pipefail; . scripts/device_env.sh || exit 1
    PYTHONUNBUFFERED=1 python3 bench/bench_speed.py --out $OUT --repeats flux=3,wan=2 \
        --budget-s flux=200,wan=540 2>&1 | tee $OUT/bench_log.txt

Smoke test on CPU at tiny dimensions (same code path; tiny Flux bypasses ComfyUI's detection,
which hard-codes 24 heads)::

    python bench/bench_speed.py --tiny --repeats 1

Variants (``--variants``, comma-separated, run in order):
  baseline   the unpatched ModelPatcher
  tau0       the node with tau=0 (dynamic schedule that never coarsens): overhead check
  dyn        the node with the dynamic schedule at --tau / --rho (node defaults otherwise)
  2x         every step at 2p               (forced "2xN")
  2x80       first 20% of steps native, rest 2p (Flux 28: "1x6,2x22", Wan 30: "1x6,2x24")
  4x         every step at 4p               (forced "4xN")
  4x80       first 20% native, rest 4p
  s=SCHED    a literal forced schedule, '/' instead of ',' (e.g. s=1x4/2x10/4x14)
  keep=F     share F of the image tokens (evenly spread) through the blocks at every step, through
             the runtime's token path (bench-only planner EvenKeep; keep=1.0: the path's overhead)
  router=B[/scorer=S][/fill=F][/start=P][/end=P][/refresh=K][/attend=1][/age=1][/uncond=U]
             the Elastic Token Router node at budget B, uncond=U the uncond branch's (its defaults otherwise: scorer context (before 2026-12-03's fourth session: ras), fill
             cache, start 0.2, end 1.0, refresh 5, attend_skipped on), e.g. router=0.5/start=0/refresh=0 routes every
             step after the first (dense: nothing to score yet); router=1.0: the node's overhead
             (an idle router is the plain model); scorer=learned times an untrained router network
             of the trained files' size (its cost does not depend on its weights); age=1 / age=0
             multiplies the scores by the age of each token's cached output (default: on)
  router=B@SCHED  the router stacked with a forced patch schedule SCHED (2x80, 4x80, 2x, s=...):
             coarse steps run every token of their grid, the router routes the native ones
  merge=R[:ORDER[:MODE]]  the Token Merge node at ratio R (0..0.75; ORDER spread|border_first, MODE
             within_frames|across_frames|both; defaults spread, within_frames) on every step
             (window 0..1, the node's own default ends at 0.8), proportional attention on
             (flags after MODE: ":noprop" turns it off; how outputs go back to the tokens:
             ":velocity" (default), ":renoise", ":residual", ":copy", see runtime/merge_path.py;
             e.g. merge=0.5:::noprop:residual)
             ORDER learned: a learned pattern (Load Merge Pattern) of random per-position embeddings,
             clustered as a trained one is: its irregular group sizes, not its quality
  merge=R[:ORDER[:MODE]]@SCHED  the same stacked on a forced patch schedule SCHED (any schedule
             token above: 2x80, s=1x6/2x22, ...): coarse steps run unmerged, native ones merged
Suffix "+g" forces cuda_graphs=True, "+e" forces it off; a coarse variant without a suffix is
expanded according to --cuda-graphs (both: eager, then graphs). Suffix "+A" attaches a patch
adapter of rank --adapter-rank for the schedule's coarse sizes, as Load Patch Adapter does (eager:
adapter steps do not use CUDA graphs). Its LoRA B is zero, as peft initialises it, so the images
equal the training-free ones, but every adapter layer and LoRA product is computed: the time is a
trained adapter's. baseline/tau0/dyn run eager
unless suffixed. If the pack cannot be imported, the baseline still runs and the rest are
marked skipped. Token counts: Flux image tokens (padded grid) + 512 text tokens (joint
attention); Wan video tokens T*ceil(H/p)*ceil(W/p).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
import weakref
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
T_START = time.perf_counter()

# --------------------------------------------------------------------------------------
# model / workload definitions
# --------------------------------------------------------------------------------------

FLUX_DEV = dict(
    image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
    hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
    axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
)
FLUX_TINY = dict(FLUX_DEV, hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1,
                 axes_dim=[8, 12, 12])

WAN_13B = dict(
    image_model="wan2.1", model_type="t2v", dim=1536, out_dim=16, num_heads=12, ffn_dim=8960,
    num_layers=30, patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1), qk_norm=True,
    cross_attn_norm=True, eps=1e-6, in_dim=16,
)
WAN_TINY = dict(WAN_13B, dim=128, num_heads=1, ffn_dim=256, num_layers=1)

WORKLOADS = {
    # latent shapes: Flux 1024x1024 -> 1x16x128x128; Wan 832x480x81 -> 1x16x21x60x104
    "flux": dict(label="FLUX.1-dev 1024x1024", steps=28, cfg=1.0, sampler="euler",
                 scheduler="simple", latent=(1, 16, 128, 128), tiny_latent=(1, 16, 16, 16),
                 context=(1, 512, 4096), pooled=(1, 768), guidance=3.5, negative=False),
    "wan": dict(label="Wan2.1-T2V-1.3B 832x480x81", steps=30, cfg=6.0, sampler="uni_pc",
                scheduler="simple", latent=(1, 16, 21, 60, 104), tiny_latent=(1, 16, 3, 16, 16),
                context=(1, 512, 4096), pooled=None, guidance=None, negative=True),
}

DEFAULT_VARIANTS = "baseline,tau0,2x,2x80,4x"


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="flux,wan", help="comma list, run in order: flux,wan")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma list (see module doc)")
    p.add_argument("--cuda-graphs", choices=["both", "off", "on"], default="both",
                   help="how unsuffixed coarse variants expand (default both)")
    p.add_argument("--repeats", default="3",
                   help="timed runs per variant: N, or per model e.g. flux=3,wan=2 (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per variant (default 1)")
    p.add_argument("--budget-s", default="0",
                   help="deadline in seconds since start after which no new run is started (0 = none): "
                        "N for all models or per model, e.g. flux=170,wan=530 (so Wan keeps its share). "
                        "A variant is skipped when its estimated warm-up + one run would pass the "
                        "deadline; a started variant keeps at least one timed run")
    p.add_argument("--out", default=str(REPO_ROOT / "out" / "bench_speed"), help="output folder")
    p.add_argument("--tiny", action="store_true", help="tiny dims (CPU smoke test of the same path)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: cpu with --tiny, else cuda")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="weight dtype (auto: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--loader", choices=["direct", "state_dict"], default="direct",
                   help="direct (default): ComfyUI's own model config class -> get_model(device=GPU), "
                        "weights filled in place, wrapped in comfy.model_patcher.ModelPatcher (peak = 1x "
                        "weights); state_dict: random state dict on the GPU through "
                        "comfy.sd.load_diffusion_model_state_dict, i.e. detection + the UNETLoader path "
                        "(peak = 2x weights, +1x uninitialised host RAM, a few s more; falls back to "
                        "direct where detection cannot reproduce the config, e.g. tiny Flux)")
    p.add_argument("--weight-std", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", default="", help="override steps: N or flux=28,wan=30")
    p.add_argument("--wan-sampler", default=None, help="override Wan sampler (default uni_pc)")
    p.add_argument("--adapter-rank", type=int, default=32, help="LoRA rank of '+A' variants (default 32)")
    p.add_argument("--tau", type=float, default=None, help="tau for the 'dyn' variant")
    p.add_argument("--rho", type=float, default=None, help="rho for the 'dyn' variant")
    p.add_argument("--cuda-malloc-async", action="store_true",
                   help="use PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync like ComfyUI's main.py")
    p.add_argument("--no-pack", action="store_true", help="do not import the pack (baseline only)")
    p.add_argument("--verbose", action="store_true", help="ComfyUI INFO logging")
    return p.parse_args(argv)


def per_model(spec: str, model: str, default, cast=int):
    """'3' -> 3 for every model; 'flux=3,wan=2' -> per model (missing -> default)."""
    spec = (spec or "").strip()
    if not spec:
        return default
    if "=" not in spec:
        return cast(spec)
    for part in spec.split(","):
        k, _, v = part.partition("=")
        if k.strip() == model:
            return cast(v)
    return default


# --------------------------------------------------------------------------------------
# ComfyUI bootstrap
# --------------------------------------------------------------------------------------

def find_comfyui() -> Path:
    return _comfy_setup().find_comfyui()


NOTES: list[str] = []


def setup_comfyui(device: str, verbose: bool):
    setup = _comfy_setup()
    info = setup.setup_comfyui(device, verbose)
    NOTES.extend(n for n in setup.NOTES if n not in NOTES)
    return info


def _comfy_setup():
    """The pack's ComfyUI start-up for standalone processes (training/comfy_setup.py)."""
    return pack_module("training.comfy_setup")


def pack_module(submodule: str):
    """A module of this repo imported as package `elastic_tokens` (e.g. "ideas.patch.config")."""
    support = str(REPO_ROOT / "tests" / "support")
    if support not in sys.path:
        sys.path.append(support)
    import comfy_runtime  # the one place that knows how to import this folder as a package

    return importlib.import_module(f"{comfy_runtime.load_pack().__name__}.{submodule}")


def attach_untrained_adapter(patcher, factors, rank: int, seed: int):
    """``patcher`` cloned with a patch adapter as the trainer starts one (coarse layers and LoRA B
    zero, LoRA A random), attached the way the Load Patch Adapter node does."""
    import torch

    bindings = pack_module("families")
    pa = pack_module("ideas.patch.adapter_file")
    attach = pack_module("ideas.patch.adapter_attach").attach_patch_adapter
    binding = bindings.binding_for(patcher)
    spec = pa.AdapterSpec.for_model(patcher, binding, factors, rank, training={"untrained": "bench_speed"})
    gen = torch.Generator().manual_seed(seed)
    dm = patcher.model.diffusion_model
    lora = {}
    for k in factors:
        lora[k] = {}
        for name in binding.feed_forward:
            out_f, in_f = dm.get_submodule(name).weight.shape
            lora[k][name] = (torch.randn(rank, in_f, generator=gen) / in_f ** 0.5, torch.zeros(out_f, rank))
    return attach(patcher, pa.PatchAdapter(spec, lora), 1.0, f"untrained rank {rank}")


def load_pack():
    """Import the repo as package `elastic_tokens` and return (PatchScheduleConfig, apply_patch_schedule)."""
    return pack_module("ideas.patch.config").PatchScheduleConfig, pack_module("ideas.patch").apply_patch_schedule


# --------------------------------------------------------------------------------------
# variants and schedules
# --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Variant:
    name: str              # display name, e.g. "2x80+g"
    kind: str              # baseline | tau0 | dyn | forced
    schedule: str = ""     # forced schedule string (comma-separated, "FxN" groups)
    cuda_graphs: bool = False
    adapter: bool = False  # "+A": an untrained patch adapter attached (see module doc)
    keep: float = 1.0      # "keep=F": share of image tokens through the blocks (runtime token path)
    router: dict | None = None  # "router=...": RouterConfig settings (ideas/drop/config.py)
    merge: tuple | None = None  # "merge=R[:ORDER[:MODE]]": (ratio, order, mode) of the Token Merge node


def expand_schedule(s: str) -> list[int]:
    """Per-step factors of a forced schedule, read by the node's own parser (no ComfyUI needed)."""
    return list(pack_module("ideas.patch.config").parse_forced_schedule(s))


def compress_schedule(factors: list[int]) -> str:
    """Per-step factors in the forced-schedule syntax (the pack's own writer)."""
    return pack_module("ideas.patch.config").format_schedule(factors)


def forced_for(token: str, steps: int) -> str:
    if token in ("2x", "4x"):
        return f"{token[0]}x{steps}"
    if token in ("2x80", "4x80"):
        native = int(math.ceil(0.2 * steps - 1e-9))
        return f"1x{native},{token[0]}x{steps - native}"
    if token.startswith("s="):
        return token[2:].replace("/", ",")
    raise ValueError(f"unknown variant {token!r}")


def build_variants(spec: str, graphs_mode: str, steps: int) -> list[Variant]:
    out = []
    for raw in [t.strip() for t in spec.split(",") if t.strip()]:
        forced_graphs = None
        tok = raw
        if tok.endswith("+A"):
            tok = tok[:-2]
            sched = forced_for(tok, steps)
            if len(expand_schedule(sched)) != steps:
                raise ValueError(f"variant {raw}: schedule {sched!r} does not have {steps} steps")
            out.append(Variant(tok + "+A", "forced", sched, False, adapter=True))
            continue
        if tok.endswith("+g"):
            tok, forced_graphs = tok[:-2], True
        elif tok.endswith("+e"):
            tok, forced_graphs = tok[:-2], False
        if tok.startswith("router="):
            settings, _, sched_tok = tok.partition("@")
            router = parse_router(settings)
            sched = ""
            if sched_tok:
                sched = forced_for(sched_tok, steps)
                n = len(expand_schedule(sched))
                if n != steps:
                    raise ValueError(f"variant {raw}: schedule {sched!r} has {n} steps, run has {steps}")
            out.append(Variant(tok + ("+g" if forced_graphs else ""), "router", sched, bool(forced_graphs),
                               router=router))
            continue
        if tok.startswith("merge="):
            out.append(parse_merge(raw, tok, steps))
            continue
        if tok.startswith("keep="):
            share = float(tok[5:])
            if not 0.0 < share <= 1.0:
                raise ValueError(f"variant {raw}: keep must be in (0, 1]")
            out.append(Variant(tok, "keep", "", False, keep=share))
            continue
        if tok in ("baseline", "tau0", "dyn"):
            if tok == "baseline" and forced_graphs:
                raise ValueError("baseline has no cuda_graphs option")
            g = bool(forced_graphs)
            out.append(Variant(tok + ("+g" if g else ""), tok, "", g))
            continue
        sched = forced_for(tok, steps)
        n = len(expand_schedule(sched))
        if n != steps:
            raise ValueError(f"variant {raw}: schedule {sched!r} has {n} steps, run has {steps}")
        if forced_graphs is not None:
            modes = [forced_graphs]
        else:
            modes = {"both": [False, True], "off": [False], "on": [True]}[graphs_mode]
        for g in modes:
            out.append(Variant(tok + ("+g" if g else ""), "forced", sched, g))
    return out


ROUTER_KEYS = {"scorer": "scorer", "fill": "fill", "start": "start_percent", "end": "end_percent",
               "refresh": "refresh_every", "attend": "attend_skipped", "age": "age_weight",
               "uncond": "uncond_budget"}


def parse_router(text: str) -> dict:
    """``router=0.5/scorer=context/start=0`` -> RouterConfig settings, checked by RouterConfig itself."""
    head, *opts = text.split("/")
    try:
        settings = {"budget": float(head[len("router="):])}
    except ValueError:
        raise ValueError(f"variant {text}: router=B needs a budget number, e.g. router=0.5") from None
    for opt in opts:
        key, _, value = opt.partition("=")
        if key not in ROUTER_KEYS or not value:
            raise ValueError(f"variant {text}: unknown router option {opt!r} "
                             f"(known: {', '.join(k + '=' for k in ROUTER_KEYS)})")
        name = ROUTER_KEYS[key]
        if name in ("attend_skipped", "age_weight"):
            if value not in ("0", "1"):
                raise ValueError(f"variant {text}: write {key}=1 (or {key}=0)")
            settings[name] = value == "1"
            continue
        settings[name] = (int(value) if name == "refresh_every" else
                          float(value) if name.endswith("_percent") or name == "uncond_budget" else value)
    pack_module("ideas.drop.config").RouterConfig(**settings)  # its own validation and messages
    return settings


def add_router(patcher, v: Variant, args):
    """``patcher`` with the Elastic Token Router of ``v`` (and its patch schedule, if any)."""
    router = pack_module("ideas.drop")
    config = pack_module("ideas.drop.config").RouterConfig(**v.router)
    if config.scorer == "learned":  # timing only: an untrained router of the file format's size
        import torch

        rf = pack_module("ideas.drop.router_file")
        binding = pack_module("families").binding_for(patcher)
        net = rf.new_router(rf.RouterSpec.for_model(patcher, binding, training={"bench_speed": "untrained"}))
        torch.nn.init.normal_(net.net.out.weight, std=0.1)
        patcher = rf.attach_router(patcher, net, "untrained (bench_speed)")
    mp = router.apply_router(patcher, config)
    cfg = {"router": dataclasses.asdict(config)}
    if v.schedule:
        schedule = make_config(pack_module("ideas.patch.config").PatchScheduleConfig, v, args)
        mp = pack_module("ideas.patch").apply_patch_schedule(mp, schedule)
        cfg["schedule"] = v.schedule
    return mp, cfg


def router_tokens(binding, latent, ctx_len: int, v: Variant, steps: int) -> tuple[dict, float]:
    """Planned tokens of a router variant if every native step were routed (the report has the
    real per-step counts: dense steps run every token)."""
    budget = v.router["budget"]
    factors = expand_schedule(v.schedule) if v.schedule else [1] * steps
    tokens = {str(f): tokens_at(binding, latent, f, ctx_len, budget if f == 1 else 1.0) for f in sorted(set(factors))}
    return tokens, round(sum(tokens[str(f)] for f in factors) / len(factors), 1)
def parse_merge(raw: str, tok: str, steps: int) -> Variant:
    """``merge=R[:ORDER[:MODE]][@SCHED]`` as a Variant (settings checked by the pack's own kernel)."""
    body, _, sched_tok = tok[len("merge="):].partition("@")
    parts = body.split(":")
    flags = parts[3:]
    parts = parts[:3]
    unmerges = ("velocity", "renoise", "sigma", "residual", "copy")  # the node's default first
    modes = [f for f in flags if f in unmerges]
    if any(f not in ("noprop",) + unmerges for f in flags) or len(set(flags)) != len(flags) or len(modes) > 1:
        raise ValueError(f"variant {raw}: use merge=R[:ORDER[:MODE[:noprop][:velocity|:renoise|:residual|:copy]]]"
                         f"[@SCHED]")
    proportional = "noprop" not in flags
    unmerge = modes[0] if modes else unmerges[0]
    try:
        ratio = float(parts[0])
    except ValueError:
        raise ValueError(f"variant {raw}: ratio {parts[0]!r} is not a number") from None
    order = parts[1] if len(parts) > 1 and parts[1] else "spread"
    mode = parts[2] if len(parts) > 2 and parts[2] else "within_frames"
    try:
        pack_module("kernels.merge_pattern").check_settings(ratio, "spread" if order == "learned" else order, mode)
    except ValueError as e:
        raise ValueError(f"variant {raw}: {e}") from None
    sched = ""
    if sched_tok:
        sched = forced_for(sched_tok, steps)
        n = len(expand_schedule(sched))
        if n != steps:
            raise ValueError(f"variant {raw}: schedule {sched!r} has {n} steps, run has {steps}")
    return Variant(tok, "merge", sched, False, merge=(ratio, order, mode, proportional, unmerge))


def merged_tokens(binding, latent, ctx_len: int, merge: tuple) -> int:
    """Tokens of one sample's self-attention on a merged native step (the pack's own pattern)."""
    ratio, order, mode = merge[:3]
    grid = binding.grid(latent)
    if order == "learned":
        _, sizes = random_learned_pattern(binding, grid).pattern(grid, ratio, mode)
    else:
        _, sizes = pack_module("kernels.merge_pattern").merge_pattern(grid, ratio, order, mode)
    return int(sizes.numel()) + (ctx_len if binding.joint_text else 0)


_RANDOM_PATTERNS: dict = {}


def random_learned_pattern(binding, grid):
    """A learned merge pattern of random per-position embeddings (seeded) for ``grid``: timed like a
    trained one (irregular groups, clustered per run), its quality meaningless."""
    import torch

    key = (binding.family, tuple(grid))
    if key not in _RANDOM_PATTERNS:
        lp = pack_module("ideas.merge.learned_pattern")
        spec = lp.PatternSpec(binding.family, tuple(grid), binding.native_patch, binding.temporal_patch,
                              binding.latent_channels, binding.hidden_size, 16)
        e = torch.randn(*grid, 16, generator=torch.Generator().manual_seed(0))
        _RANDOM_PATTERNS[key] = lp.LearnedPattern(spec, e, "random (speed only)")
    return _RANDOM_PATTERNS[key]


def add_token_merge(patcher, merge: tuple, binding=None, latent=None):
    ratio, order, mode, proportional, unmerge = merge
    settings = dict(ratio=ratio, order=order, video_mode=mode, start_percent=0.0, end_percent=1.0,
                    proportional_attention=proportional, unmerge=unmerge)
    if order == "learned":  # as Load Merge Pattern attaches one (no fingerprint: random weights)
        pattern = random_learned_pattern(binding, binding.grid(latent))
        patcher = pack_module("ideas.merge.learned_pattern").attach_merge_pattern(patcher, pattern)
    config = pack_module("ideas.merge.config").TokenMergeConfig(**settings)
    return pack_module("ideas.merge").apply_token_merge(patcher, config), settings


class EvenKeep:
    """A bench-only planner of the "drop" idea: the same evenly spread share of the image tokens
    through the blocks at every step (what a router's budget costs, without its scoring). keep=1.0
    runs the token path with every token: the runtime's own overhead."""

    idea = "drop"
    label = "keep (bench)"

    def __init__(self, share: float):
        self.share = share

    def start(self, binding, options, total_steps):
        import torch

        share = self.share

        class Run:
            idle = False
            needs_latent = False
            _cache: dict = {}

            def plan(self, step, plan):
                n = binding.grid_tokens(step.latent_shape, plan.factor)
                if n not in self._cache:
                    k = max(1, round(share * n))
                    self._cache[n] = torch.unique(torch.linspace(0, n - 1, k).round().long())
                return plan.replace(keep=self._cache[n])
        return Run()


def add_keep_planner(patcher, share: float):
    return pack_module("runtime.sampling_hooks").add_planner(patcher, EvenKeep(share))


def make_config(PatchScheduleConfig, v: Variant, args):
    want = {"cuda_graphs": v.cuda_graphs}
    if v.kind == "tau0":
        want.update(tau=0.0, forced_schedule="")
    elif v.kind == "dyn":
        want["forced_schedule"] = ""
        if args.tau is not None:
            want["tau"] = args.tau
        if args.rho is not None:
            want["rho"] = args.rho
    else:
        want["forced_schedule"] = v.schedule
    if dataclasses.is_dataclass(PatchScheduleConfig):
        known = {f.name for f in dataclasses.fields(PatchScheduleConfig)}
    else:
        known = set(inspect.signature(PatchScheduleConfig).parameters)
    missing = [k for k in want if k not in known]
    if missing and not (missing == ["cuda_graphs"] and not v.cuda_graphs):
        raise TypeError(f"PatchScheduleConfig has no field(s) {missing}")
    return PatchScheduleConfig(**{k: val for k, val in want.items() if k in known})


def tokens_at(binding, latent, factor: int, ctx_len: int, keep: float = 1.0) -> int:
    """Tokens of one sample's self-attention: image tokens at ``factor`` (the pack's own count),
    a share ``keep`` of them, plus the text where it joins the sequence (Flux)."""
    image = binding.grid_tokens(latent, factor)
    return round(image * keep) + (ctx_len if binding.joint_text else 0)


# --------------------------------------------------------------------------------------
# model construction
# --------------------------------------------------------------------------------------

def unet_config_for(model: str, tiny: bool) -> dict:
    cfg = dict({"flux": FLUX_TINY, "wan": WAN_TINY}[model] if tiny else {"flux": FLUX_DEV, "wan": WAN_13B}[model])
    if model == "flux":  # ComfyUI 0.33's FluxParams requires txt_ids_dims (FLUX.1: [], as its detection says)
        import dataclasses

        import comfy.ldm.flux.model
        if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
            cfg.setdefault("txt_ids_dims", [])
    return cfg


def describe_model(unet_config: dict, dtype):
    """Parameter shapes from ComfyUI's own class built on the meta device (no memory), and
    whether ComfyUI's checkpoint detection would produce exactly this config from them."""
    import torch
    import comfy.model_detection as md

    info = {"unet_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in unet_config.items()}}
    meta_cfg = md.model_config_from_unet_config(dict(unet_config))
    if meta_cfg is None:
        raise RuntimeError(f"ComfyUI has no model config matching {unet_config}")
    meta_cfg.set_inference_dtype(dtype, None)
    meta_model = meta_cfg.get_model({}, "", device=torch.device("meta"))
    shapes = {k: tuple(t.shape) for k, t in meta_model.diffusion_model.state_dict().items()}
    del meta_model
    info["params"] = sum(math.prod(s) for s in shapes.values())
    info["config_class"] = type(meta_cfg).__name__
    meta_sd = {k: torch.empty(s, device="meta", dtype=dtype) for k, s in shapes.items()}
    try:
        detected = md.detect_unet_config(meta_sd, "")
        diff = {k: (detected.get(k), v) for k, v in unet_config.items()
                if _norm(detected.get(k)) != _norm(v)}
        info["detection_matches"] = not diff
        if diff:
            info["detection_diff"] = {k: [repr(a), repr(b)] for k, (a, b) in diff.items()}
        det_cfg = md.model_config_from_unet_config(detected, meta_sd)
        info["detected_class"] = type(det_cfg).__name__ if det_cfg is not None else None
    except Exception as e:
        info["detection_matches"] = False
        info["detection_error"] = f"{type(e).__name__}: {e}"
    return shapes, meta_sd, info


def build_patcher(model: str, args, dtype):
    """Returns (ModelPatcher, info). Weights ~N(0, std), created on the load device directly."""
    import torch
    import comfy.model_detection as md
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd

    unet_config = unet_config_for(model, args.tiny)
    shapes, meta_sd, info = describe_model(unet_config, dtype)
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()

    gen = torch.Generator(device=load_device).manual_seed(args.seed)
    t0 = time.perf_counter()
    loader = args.loader
    if loader == "state_dict" and not info["detection_matches"]:
        note = (f"{model}: ComfyUI's detection cannot reproduce this config "
                f"({info.get('detection_diff') or info.get('detection_error')}); loaded directly instead")
        NOTES.append(note)
        print("note:", note, flush=True)
        loader = "direct"
    if loader == "state_dict":
        sd = {}
        for k, s in shapes.items():
            sd[k] = torch.randn(s, generator=gen, device=load_device, dtype=dtype).mul_(args.weight_std)
        patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
        del sd
        if patcher is None:
            raise RuntimeError("load_diffusion_model_state_dict returned None")
    else:
        model_config = md.model_config_from_unet_config(dict(unet_config), meta_sd)
        manual_cast = mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
        model_config.set_inference_dtype(dtype, manual_cast)
        base = model_config.get_model({}, "", device=load_device)
        with torch.no_grad():
            for p in base.diffusion_model.parameters():
                if p.device != load_device:
                    p.data = p.data.to(load_device)
                p.normal_(0.0, args.weight_std, generator=gen)
            for b in base.diffusion_model.buffers():
                if b.device != load_device:
                    b.data = b.data.to(load_device)
        base = base.to(offload_device)
        patcher = comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=offload_device)
    del meta_sd
    _sync()
    info["build_s"] = round(time.perf_counter() - t0, 2)
    info["weight_dtype"] = str(patcher.model.get_dtype())
    info["manual_cast_dtype"] = str(patcher.model.manual_cast_dtype)
    info["model_class"] = type(patcher.model).__name__ + "/" + type(patcher.model.diffusion_model).__name__
    info["loader"] = loader
    return patcher, info


def _norm(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def make_inputs(model: str, args, w):
    import torch
    g = torch.Generator().manual_seed(args.seed + 1)
    latent = w["tiny_latent"] if args.tiny else w["latent"]
    ctx = torch.randn(w["context"], generator=g)
    extra = {}
    if w["pooled"] is not None:
        extra["pooled_output"] = torch.randn(w["pooled"], generator=g)
    if w["guidance"] is not None:
        extra["guidance"] = w["guidance"]
    positive = [[ctx, dict(extra)]]
    if w["negative"]:
        neg_extra = dict(extra)
        negative = [[torch.randn(w["context"], generator=g), neg_extra]]
    else:
        neg_extra = dict(extra)
        if "pooled_output" in neg_extra:
            neg_extra["pooled_output"] = torch.zeros(w["pooled"])
        negative = [[torch.zeros(w["context"]), neg_extra]]
    return {"samples": torch.zeros(latent)}, positive, negative, tuple(latent)


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------

def _sync():
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class CallCounter:
    """Forward pre-hook on the diffusion model: counts model calls and records batch sizes."""

    def __init__(self, module):
        self.calls = 0
        self.batches = set()
        self.h = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, mod, a, kw):
        self.calls += 1
        x = a[0] if a else kw.get("x")
        if hasattr(x, "shape"):
            self.batches.add(int(x.shape[0]))

    def close(self):
        self.h.remove()


def one_run(mp, w, steps, seed, sampler, latent, positive, negative):
    import torch
    import nodes
    with torch.inference_mode():
        _sync()
        t0 = time.perf_counter()
        out = nodes.common_ksampler(mp, seed, steps, w["cfg"], sampler, w["scheduler"],
                                    positive, negative, latent)[0]["samples"]
        _sync()
        dt = time.perf_counter() - t0
    return dt, out


def over_budget(args, model, next_cost=0.0):
    deadline = per_model(args.budget_s, model, 0.0, cast=float)
    return deadline > 0 and (time.perf_counter() - T_START + next_cost) > deadline


def estimate_run_s(base_median, v_kind, mean_tokens, native_tokens):
    """Rough cost of one run of a variant from the baseline's (attention makes it superlinear)."""
    if base_median is None:
        return 0.0
    if v_kind not in ("forced", "merge"):
        return base_median
    return base_median * max(0.05, mean_tokens / native_tokens)


def find_report(cfg, mp):
    """The pack's report of ``mp``'s latest run (its public ``last_run_report``), as JSON."""
    for _ in (0,):
        r = pack_module("runtime.report").last_run_report(mp)
        if r is not None:
            out = {"report": _jsonable(r)}
            for attr in ("summary", "estimated_speedup", "saved_fraction"):
                try:
                    val = getattr(r, attr)
                    out[attr] = val() if callable(val) else val
                except Exception:
                    pass
            return out
    return None


def _jsonable(x, depth=0):
    if depth > 4:
        return repr(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        x = dataclasses.asdict(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in x][:200]
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    if hasattr(x, "tolist"):
        try:
            return _jsonable(x.tolist(), depth + 1)
        except Exception:
            pass
    return repr(x)


def bench_model(model: str, args, pack, record, save):
    import torch
    import comfy.model_management as mm

    w = WORKLOADS[model]
    steps = per_model(args.steps, model, w["steps"])
    repeats = per_model(args.repeats, model, 3)
    sampler = (args.wan_sampler if model == "wan" and args.wan_sampler else w["sampler"])
    variants = build_variants(args.variants, args.cuda_graphs, steps)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]

    minfo = {"model": model, "label": w["label"] + (" (tiny)" if args.tiny else ""), "steps": steps,
             "cfg": w["cfg"], "sampler": sampler, "scheduler": w["scheduler"], "repeats": repeats}
    record["models"][model] = minfo
    print(f"\n=== {minfo['label']}: building model ({args.loader}) ...", flush=True)
    if torch.cuda.is_available():
        try:
            torch.cuda.reset_peak_memory_stats()
        except Exception:
            pass
    patcher, binfo = build_patcher(model, args, dtype)
    minfo.update(binfo)
    latent, positive, negative, lshape = make_inputs(model, args, w)
    ctx_len = w["context"][1]
    minfo["latent"] = list(lshape)
    binding = pack_module("families").binding_for(patcher)
    minfo["tokens_native"] = tokens_at(binding, lshape, 1, ctx_len)
    print(f"    {binfo['model_class']} params={binfo['params'] / 1e9:.3f}B dtype={binfo['weight_dtype']} "
          f"built in {binfo['build_s']}s; detection_matches={binfo.get('detection_matches')}; "
          f"latent={list(lshape)} steps={steps} cfg={w['cfg']} {sampler}/{w['scheduler']}", flush=True)
    save()

    base_median = None
    eager_outputs = {}  # schedule -> final latent of its eager variant, to check graph replay
    diffusion_model = patcher.model.diffusion_model
    for v in variants:
        res = {"model": model, "variant": v.name, "kind": v.kind, "cuda_graphs": v.cuda_graphs,
               "schedule": v.schedule, "steps": steps, "times_s": [], "status": "ok"}
        record["results"].append(res)
        if v.kind == "router":
            res["tokens"], res["mean_tokens_per_step"] = router_tokens(binding, lshape, ctx_len, v, steps)
        elif v.kind == "keep":
            res["tokens"] = {"1": tokens_at(binding, lshape, 1, ctx_len, v.keep)}
            res["mean_tokens_per_step"] = res["tokens"]["1"]
        elif v.kind == "merge":  # native steps merged ("1"), coarse steps of a stacked schedule not
            factors = expand_schedule(v.schedule) if v.schedule else [1] * steps
            per = {f: merged_tokens(binding, lshape, ctx_len, v.merge) if f == 1 else tokens_at(binding, lshape, f, ctx_len)
                   for f in sorted(set(factors))}
            res["tokens"] = {str(f): c for f, c in per.items()}
            res["mean_tokens_per_step"] = round(sum(per[f] for f in factors) / len(factors), 1)
        elif v.schedule:
            factors = expand_schedule(v.schedule)
            res["tokens"] = {str(f): tokens_at(binding, lshape, f, ctx_len) for f in sorted(set(factors))}
            res["mean_tokens_per_step"] = round(
                sum(tokens_at(binding, lshape, f, ctx_len) for f in factors) / len(factors), 1)
        else:
            res["tokens"] = {"1": minfo["tokens_native"]}
            res["mean_tokens_per_step"] = minfo["tokens_native"]
        est = estimate_run_s(base_median, v.kind, res["mean_tokens_per_step"], minfo["tokens_native"])
        if over_budget(args, model, est * (max(args.warmup, 0) + 1)):
            res["status"] = "skipped: time budget"
            print(f"  {v.name:<12} skipped (time budget)", flush=True)
            save()
            continue
        mp, cfg = patcher, None
        try:
            if v.kind == "keep":
                mp, cfg = add_keep_planner(patcher, v.keep), {"keep": v.keep}
            elif v.kind == "router":
                if pack is None:
                    res["status"] = "skipped: pack not importable"
                    print(f"  {v.name:<12} skipped (pack not importable)", flush=True)
                    save()
                    continue
                mp, cfg = add_router(patcher, v, args)
                res["config"] = _jsonable(cfg)
            elif v.kind == "merge" and pack is not None:
                base = patcher
                if v.schedule:
                    PatchScheduleConfig, apply_patch_schedule = pack
                    base = apply_patch_schedule(patcher, make_config(PatchScheduleConfig, v, args))
                mp, cfg = add_token_merge(base, v.merge, binding, lshape)
                res["config"] = cfg
            elif v.kind != "baseline":
                if pack is None:
                    res["status"] = "skipped: pack not importable"
                    print(f"  {v.name:<12} skipped (pack not importable)", flush=True)
                    save()
                    continue
                PatchScheduleConfig, apply_patch_schedule = pack
                cfg = make_config(PatchScheduleConfig, v, args)
                res["config"] = _jsonable(cfg)
                base = patcher
                if v.adapter:
                    factors = sorted({f for f in expand_schedule(v.schedule) if f > 1})
                    base = attach_untrained_adapter(patcher, factors, args.adapter_rank, args.seed)
                    res["adapter"] = {"factors": factors, "rank": args.adapter_rank}
                mp = apply_patch_schedule(base, cfg)
            # warm-up; the first one counts diffusion_model.__call__s and their batch sizes
            # (a forward pre-hook; CUDA-graph replays bypass __call__, captures may add calls)
            counter = CallCounter(diffusion_model)
            try:
                warm = []
                for i in range(max(args.warmup, 0)):
                    dt, out = one_run(mp, w, steps, args.seed, sampler, latent, positive, negative)
                    warm.append(round(dt, 4))
                    if i == 0:
                        res["warmup_model_calls"] = counter.calls
                        res["batch_sizes"] = sorted(counter.batches)
            finally:
                counter.close()
            res["warmup_s"] = warm
            last = warm[-1] if warm else 0.0
            for r in range(repeats):
                if r > 0 and over_budget(args, model, last):
                    res["status"] = f"partial: time budget after {r} of {repeats} runs"
                    break
                dt, out = one_run(mp, w, steps, args.seed, sampler, latent, positive, negative)
                res["times_s"].append(round(dt, 4))
                last = dt
            try:  # high VRAM: the whole model should stay loaded on the GPU
                res["loaded_fraction"] = round(mp.loaded_size() / max(mp.model_size(), 1), 4)
            except Exception:
                pass
            res["finite"] = bool(torch.isfinite(out).all().item())
            res["out_std"] = float(out.float().std().item())
            if v.schedule and not v.cuda_graphs:
                eager_outputs[v.schedule] = out.detach().float().cpu()
            elif v.schedule and v.schedule in eager_outputs:  # same seed: replay must match eager
                ref_out = eager_outputs[v.schedule]
                diff = (out.detach().float().cpu() - ref_out).abs().max().item()
                res["graph_vs_eager_max_abs"] = diff
                res["graph_vs_eager_rel"] = diff / max(ref_out.abs().max().item(), 1e-12)
            rep = find_report(cfg, mp) if cfg is not None else None
            if rep is not None:
                res["last_report"] = rep
                if v.kind == "router":  # what the router computed per step (dense steps run every token)
                    res["step_tokens"] = rep["report"].get("step_tokens")
            med = statistics.median(res["times_s"])
            res["median_s"] = round(med, 4)
            res["ms_per_step"] = round(1000.0 * med / steps, 2)
            if v.kind == "baseline":
                base_median = med
            if base_median:
                res["speedup"] = round(base_median / med, 3)
            print(f"  {v.name:<12} median {med:8.3f}s  {res['ms_per_step']:8.1f} ms/step  "
                  f"x{res.get('speedup', float('nan')):.3f}  runs={res['times_s']}  warm={warm}  "
                  f"warmup_calls={res.get('warmup_model_calls')} batch={res.get('batch_sizes')} "
                  f"finite={res['finite']} loaded={res.get('loaded_fraction')}"
                  + (f" graph_replays={rep.get('report', {}).get('graph_replays')}" if isinstance(rep, dict) else "")
                  + (f" graph_vs_eager_rel={res['graph_vs_eager_rel']:.2e}" if "graph_vs_eager_rel" in res else ""),
                  flush=True)
        except Exception as e:
            res["status"] = f"error: {type(e).__name__}: {e}"
            res["traceback"] = traceback.format_exc()
            print(f"  {v.name:<12} ERROR {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
        finally:
            if mp is not patcher:
                del mp
            cfg = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            save()

    if torch.cuda.is_available():
        minfo["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    # free the model before the next one
    ref = weakref.ref(patcher.model)
    mm.unload_all_models()
    del patcher, diffusion_model
    gc.collect()
    mm.cleanup_models()
    mm.soft_empty_cache()
    minfo["freed"] = ref() is None
    if torch.cuda.is_available():
        minfo["alloc_after_free_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
    print(f"    freed={minfo['freed']} peak={minfo.get('peak_alloc_gib')} GiB "
          f"after_free={minfo.get('alloc_after_free_gib')} GiB", flush=True)
    save()


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------

def markdown(record) -> str:
    m = record["meta"]
    lines = [
        "# Elastic Tokens speed benchmark",
        "",
        f"- device: {m.get('device_name')} ({m.get('device')}), torch {m.get('torch')}, "
        f"CUDA {m.get('cuda')}, ComfyUI {m.get('comfyui_version')}, attention {m.get('attention')}, "
        f"vram_state {m.get('vram_state')}",
        f"- command: `{m.get('command')}`",
        f"- pack: {'imported' if m.get('pack_import_ok') else 'NOT imported: ' + str(m.get('pack_import_error'))}",
    ]
    for n in m.get("notes", []):
        lines.append(f"- note: {n}")
    for name, mi in record["models"].items():
        if "params" not in mi:
            lines.append(f"- {name}: {mi.get('status') or mi.get('error') or 'not built'}")
            continue
        if "error" in mi:
            lines.append(f"- {name}: ERROR {mi['error']}")
        lines.append(f"- {name}: {mi.get('label')}, {mi.get('params', 0) / 1e9:.3f}B params, "
                     f"{mi.get('weight_dtype')}, latent {mi.get('latent')}, {mi.get('steps')} steps, "
                     f"cfg {mi.get('cfg')}, {mi.get('sampler')}/{mi.get('scheduler')}, "
                     f"peak {mi.get('peak_alloc_gib')} GiB, loader {mi.get('loader')}")
    lines += ["", "| model | variant | schedule | median s | ms/step | speedup | tokens (factor: count) "
                  "| steps run at p/2p/4p | runs | status |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["results"]:
        toks = ", ".join(f"{f}: {c}" for f, c in r.get("tokens", {}).items())
        if len(r.get("tokens", {})) > 1:
            toks += f" (mean {r.get('mean_tokens_per_step')})"
        if r.get("step_tokens"):  # a router's image tokens per step as run (dense steps: all)
            run_tokens = [t for t in r["step_tokens"] if t]
            toks += f"; image tokens run per step: mean {sum(run_tokens) / max(len(run_tokens), 1):.0f}"
        med = r.get("median_s")
        ran = "-"
        try:
            sf = r["last_report"]["report"]["step_factors"]
            ran = "/".join(str(sum(1 for f in sf if f == k)) for k in (1, 2, 4))
            merged = sum(1 for m in r["last_report"]["report"].get("step_merged") or () if m)
            if merged:
                ran += f" ({merged} merged)"
            fb = r["last_report"]["report"].get("fallbacks")
            if fb:
                ran += f" (fallbacks {fb})"
        except Exception:
            if r["kind"] == "baseline" and med is not None:
                ran = f"{r['steps']}/0/0"
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["model"], r["variant"], r.get("schedule") or ("dynamic" if r["kind"] in ("tau0", "dyn") else "-"),
            f"{med:.3f}" if med is not None else "-",
            f"{r['ms_per_step']:.1f}" if "ms_per_step" in r else "-",
            f"{r['speedup']:.3f}x" if "speedup" in r else "-",
            toks, ran, len(r.get("times_s", [])),
            r["status"] if r["status"] == "ok" or len(r["status"]) < 80 else r["status"][:77] + "..."))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# providers for the training command (--model random:flux / random:wan)
# --------------------------------------------------------------------------------------

class RandomSizeProvider:
    """Real-size FLUX.1-dev / Wan 2.1 1.3B, random weights and conditioning (the training command's ``random:flux`` / ``random:wan``)."""

    sampler = "euler"
    scheduler = "simple"

    def __init__(self, family: str, args):
        self.family = family
        self.w = WORKLOADS[family]
        self.steps = args.sample_steps or 8
        self.cfg = self.w["cfg"] if args.cfg is None else args.cfg
        self.args = argparse.Namespace(tiny=args.tiny_random, seed=args.seed, weight_std=0.02, loader="direct")
        self._latent = self._pos = self._neg = None

    def setup(self, device):
        setup_comfyui(device, verbose=False)

    def load(self):
        import torch

        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        patcher, _ = build_patcher(self.family, self.args, dtype)
        latent, self._pos, self._neg, _ = make_inputs(self.family, self.args, self.w)
        self._latent = latent["samples"]
        return patcher

    def empty_latent(self, batch):
        return self._latent.expand(batch, *self._latent.shape[1:]).clone()

    def conditioning(self, seeds):
        return self._pos, self._neg




def random_flux_provider(args):
    return RandomSizeProvider("flux", args)


def random_wan_provider(args):
    return RandomSizeProvider("wan", args)


def main(argv=None):
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cpu" if args.tiny else "cuda"
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in WORKLOADS:
            raise SystemExit(f"unknown model {m!r} (choose from {list(WORKLOADS)})")
    # validate the variant list before spending any time
    for m in models:
        build_variants(args.variants, args.cuda_graphs, per_model(args.steps, m, WORKLOADS[m]["steps"]))

    if args.cuda_malloc_async and args.device == "cuda":  # before torch touches CUDA
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False (use --tiny / --device cpu)")
    info = setup_comfyui(args.device, args.verbose)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "tiny": args.tiny,
        "dtype": args.dtype,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        **info,
    }
    try:
        import subprocess
        meta["git_commit"] = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                                            capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        pass
    record = {"meta": meta, "models": {}, "results": []}

    pack = None
    if args.no_pack:
        meta["pack_import_ok"] = False
        meta["pack_import_error"] = "--no-pack"
    else:
        try:
            pack = load_pack()
            meta["pack_import_ok"] = True
        except Exception as e:
            meta["pack_import_ok"] = False
            meta["pack_import_error"] = f"{type(e).__name__}: {e}"
            print(f"WARNING: could not import the pack ({type(e).__name__}: {e}); running the baseline only",
                  flush=True)
            traceback.print_exc()
    meta["notes"] = NOTES

    def save():
        meta["elapsed_s"] = round(time.perf_counter() - T_START, 1)
        (out_dir / "bench_speed.json").write_text(json.dumps(record, indent=1, default=repr))
        (out_dir / "bench_speed.md").write_text(markdown(record))

    print(f"device={meta['device_name']} torch={meta['torch']} ComfyUI={meta['comfyui_version']} "
          f"vram_state={meta['vram_state']} attention={meta.get('attention')} pack={meta['pack_import_ok']}",
          flush=True)
    for n in NOTES:
        print("note:", n, flush=True)
    for m in models:
        if over_budget(args, m):
            record["models"][m] = {"model": m, "status": "skipped: time budget"}
            print(f"\n=== {m}: skipped (time budget)", flush=True)
            continue
        try:
            bench_model(m, args, pack, record, save)
        except Exception as e:
            record["models"].setdefault(m, {})["error"] = f"{type(e).__name__}: {e}"
            record["models"][m]["traceback"] = traceback.format_exc()
            print(f"=== {m}: ERROR {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        save()
    save()
    print("\n" + markdown(record), flush=True)
    print(f"wrote {out_dir / 'bench_speed.json'} and {out_dir / 'bench_speed.md'} "
          f"({meta['elapsed_s']} s)", flush=True)
    failed = [r for r in record["results"] if r["status"].startswith("error")]
    bad_models = [m for m, mi in record["models"].items() if "error" in mi]
    return 1 if (failed or bad_models) else 0


if __name__ == "__main__":
    sys.exit(main())
