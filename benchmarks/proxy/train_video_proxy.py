#!/usr/bin/env python3
"""Train a small PROXY video model with ComfyUI's own Wan 2.1 class on clips made from Fashion-MNIST.

Purpose: the video twin of ``train_image_proxy.py`` (docs/design_notes.md section 4): an
offline stand-in for Wan 2.1 T2V on which accelerated sampling can be compared with full sampling.
Same code path as Wan 2.1: ``comfy.ldm.wan.model.WanModel`` (t2v: Conv3d patch embed (1, 2, 2),
3-D RoPE over frames x rows x columns, self-attention over all frames, text cross-attention,
time modulation, head, unpatchify), trained through ``families/autograd_forward.wan_forward``. The
exported file is detected by ComfyUI's OWN Wan detection (``comfy.sd.load_diffusion_model_state_dict``,
what UNETLoader calls) with no override: heads = dim // 128, text_dim 4096 (detection does not read
text_dim, so the model is built with Wan's default), ffn_dim / num_layers / in_dim from the weights.

Data recipe (offline, deterministic given the seed)
--------------------------------------------------
Fashion-MNIST train split (60k; ``.proxy_data/`` from ``scripts/proxy_data.sh``, else
/usr/share/datasets/fashion-mnist; read by ``train_image_proxy.read_idx``/``load_data``; t10k is
left for evaluation). Clips are built ON THE TRAINING DEVICE for every batch (:func:`make_clips`)
from parameters drawn from the training generator: 9 frames of 64x64 grayscale. World = the frame
square [-1, 1]^2; the item (28x28 image, black background) is a square of half-size
``si ~ U(0.5, 0.7)`` (24-60 px on screen); a smooth background (a 5x5 random field, bilinear,
reflected, spanning [-2, 2]^2 of the world, amplitude ``U(0, 0.35)``) is blended under it
(screen blend ``1 - (1 - item)(1 - bg)``, intensities in [0, 1], then -> [-1, 1]). Each clip is
one of three motions (equal odds):

  (a) camera PAN: the item sits still in the world, the camera slides linearly so the item's
      screen position goes from ``p0`` to ``p1`` (each ``U(-0.4, 0.4)^2``); the background moves
      with the item;
  (b) camera ZOOM about a fixed point (item at ``-c/z`` on screen, ``c ~ U(-0.2, 0.2)^2``), the
      zoom ``z`` goes geometrically from ``U(0.75, 0.95)`` to ``U(1.15, 1.35)`` or back (zoom in
      or out with equal odds); background scales with it;
  (c) the item MOVES linearly from ``p0`` to ``p1`` over a static background (static camera).

Frames are rendered with ``F.affine_grid`` / ``F.grid_sample`` (bilinear, align_corners False;
item outside its square = black). Latent per frame = ``pixel_unshuffle(4)`` of the [-1, 1] frame
-> 16x16x16; the clip latent is ``(B, 16, 9, 16, 16)`` = (channels, frames, rows, columns) as
Wan's. THE FRAMES ARE NOT TEMPORALLY COMPRESSED (Wan's VAE packs 4 frames into one latent frame;
here the "VAE" is the lossless ``pixel_unshuffle``, decode = ``pixel_shuffle``, one latent frame
per video frame). In ComfyUI terms this latent is what ``EmptyHunyuanLatentVideo`` gives for
width = height = 128, length = 33 (16x9x16x16), i.e. 9 * 8 * 8 = 576 tokens after the (1, 2, 2)
patch. The latent is the RAW unshuffled pixels: ComfyUI's Wan21 latent format is NOT applied in
training (``video_provider.py`` documents why text-to-video sampling still matches, and how its
decode undoes ``process_latent_out``).

Model (defaults): WanModel t2v, in/out 16 ch, patch (1, 2, 2), dim 256, num_heads 2 (= 256 // 128,
what detection derives), ffn_dim 1024, 5 layers, freq_dim 256, text_dim 4096, qk_norm,
cross_attn_norm, eps 1e-6: 6.95M parameters, 13.3 MiB in fp16 (one file, under the 15.5 MiB shard
limit; ``--layers 4``: 5.9M, 11.3 MiB; text_embedding's 4096 -> 256 input layer alone is 1.05M). Init: Linear/Conv weights
N(0, 0.02), biases 0, norm weights 1, block/head ``modulation`` N(0, 1/dim) (Wan's init),
``head.head`` zero (the model starts by predicting v = 0). Conditioning through the text path: a
learned ``class_tokens`` table [11, 4, 4096] (10 classes + index 10 = "empty" for CFG); context =
class_tokens[label] (4 text tokens; ComfyUI's Wan does not pad the context, so CONDITIONING of
shape (B, 4, 4096) is exactly this). Labels dropped to 10 with p = 0.1.

Objective: rectified flow as ComfyUI's Wan uses it (``ModelType.FLOW`` = ModelSamplingDiscreteFlow
+ CONST, multiplier 1000): x_s = (1 - s) x0 + s eps, the model's timestep input = 1000 s, target
v = eps - x0 (CONST: denoised = x_s - s v), MSE. Training s: ``shift(u)`` with u ~ logit-normal(0, 1)
and ``--train-shift`` (default 1.0, i.e. plain logit-normal, as the image proxy). AdamW lr 3e-4
(linear warmup 500 steps, then constant), betas (0.9, 0.99), wd 0, grad clip 1.0, bf16 autocast on
CUDA (fp32 on CPU), batch 128 clips (73.7k tokens a step), EMA 0.999 of the Wan params + class
tokens (decay min(0.999, (1+s)/(10+s))). All randomness (batch indices, clip parameters, s, noise,
label dropout) comes from one generator on the training device, saved in the checkpoint with the
CPU RNG state, so a resumed run continues exactly as an uninterrupted one (same device).

Sampling shift: the stock Wan 2.1 setting (``WAN21_T2V.sampling_settings``) is shift 8.0, meant for
~32k-token 480p videos; on 576 tokens of lossless pixels it would put 2/3 of the steps above
s = 0.8 and leave ~3 of 30 steps for everything below s = 0.45. The proxy is therefore used with
a ``ModelSamplingSD3`` shift of 3.0 (metadata ``sampling_shift``; the repo's Wan workflow already
has a ModelSamplingSD3 node, set to 8.0 for the real model), which is about the image proxy's
effective shift (FLUX's mu 1.15 = SD3 shift e^1.15 = 3.16) and Wan 1.3B's own 480p recommendation.
``video_provider.py`` applies it with ComfyUI's ModelSamplingSD3 node.

Sampler used for ``samples.png``: Euler, 30 steps, sigmas = EXACTLY ComfyUI's "simple" schedule of
ModelSamplingDiscreteFlow(shift 3.0, multiplier 1000) (its 1000-entry float32 table read at
``-(1 + int(i * 1000 / N))``, :func:`wan_sigmas`), CFG 3 against the empty class; rows = 10
classes x ``--sample-clips`` clips, columns = the 9 frames of one clip. ``data.png``: 12 training
clips as the model sees them (rows: pan, zoom, move, ...).

Outputs of ``--export DIR``: ``video_proxy.safetensors`` (EMA WanModel weights, fp16, ComfyUI key
names = ``WanModel.state_dict()``; metadata ``config`` (the WanModel kwargs), ``sampling_shift``,
``data_recipe``, ``steps``, ``loss``, ``version``, ``objective``; sharded into
``video_proxy-0000i-of-0000n.safetensors`` above ``--shard-mib`` and joined with ``--merge DIR``),
``video_proxy_text.safetensors`` (``class_tokens`` fp16 [11, 4, 4096], metadata ``class_names``),
``samples.png``, ``data.png``, ``train_log.json``.

Commands
--------
  bash scripts/proxy_data.sh                               # here: fills .proxy_data/
  # GPU machine (carry [".whl", ".proxy_data"]), one command of < 10 minutes:
  . scripts/device_env.sh && python3 benchmarks/proxy/train_video_proxy.py --data .proxy_data \\
      --minutes 8 --ckpt /tmp/video_proxy_ckpt.pt --export $OUT
  # continue on the same (still warm) machine: ... --resume /tmp/video_proxy_ckpt.pt --ckpt /tmp/video_proxy_ckpt.pt
  # Expected on one H100 (not measured yet): ~15-20 steps/s at batch 128 (the image proxy did 22.6 at
  # 256 x 256 tokens), i.e. ~7-9k steps in 8 minutes. Measured here on 2 CPU cores, real data, batch 8:
  # default model 1.0 steps/s (loss 1.46 -> 1.11 in 45 steps); dim 128 / 2 layers 6.3 steps/s (1.25 -> 0.17
  # in 360 steps).
  # CPU smoke test: .venv/bin/python benchmarks/proxy/train_video_proxy.py --synthetic \\
  #     --dim 128 --layers 1 --ffn 256 --batch 2 --max-steps 20 --export /tmp/video_proxy_out
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
if str(HERE) not in sys.path:  # sibling proxy modules (train_image_proxy)
    sys.path.append(str(HERE))
VERSION = "elastic-tokens video-proxy v1 (benchmarks/proxy/train_video_proxy.py)"
FRAMES = 9
SIZE = 64
EMPTY = 10
TEXT_DIM = 4096  # ComfyUI's Wan detection does not read text_dim: the model always gets Wan's 4096
SAMPLE_SHIFT = 3.0
SAMPLE_STEPS = 30
SAMPLE_CFG = 3.0
MOTIONS = ("pan", "zoom", "move")
DATA_RECIPE = ("Fashion-MNIST (Debian dataset-fashion-mnist, train split 60k) -> clips built on the fly: "
               "9 frames 64x64 gray, item half-size U(0.5,0.7) of the frame over a smooth 5x5-field background "
               "(amplitude U(0,0.35), screen blend); motion pan / zoom (0.75-0.95 <-> 1.15-1.35) / moving item, "
               "equal odds, affine_grid+grid_sample (bilinear); frame [-1,1] -> pixel_unshuffle(4) = 16x16x16 raw "
               "latent per frame, clip latent (16, 9, 16, 16), no temporal compression, no Wan latent scaling; "
               "decode = pixel_shuffle(4) per frame")


# --------------------------------------------------------------------------- shared code of the image proxy

def image_trainer():
    """benchmarks/proxy/train_image_proxy.py as a module (run_device, read_idx, load_data, save_grid)."""
    import train_image_proxy  # benchmarks/proxy is on sys.path (see the top of this file)

    return train_image_proxy


CLASS_NAMES = image_trainer().CLASS_NAMES


def load_wan_forward():
    return image_trainer().load_train_forward().wan_forward


def load_data(args):
    """(images uint8 [N, 28, 28], labels int64 [N]) on CPU: the image proxy's reader (train split)."""
    return image_trainer().load_data(args)


# --------------------------------------------------------------------------- clips

def make_clips(imgs_u8: torch.Tensor, gen: torch.Generator, frames: int = FRAMES, size: int = SIZE,
               bg_max: float = 0.35, return_kind: bool = False):
    """uint8 [B, 28, 28] (on the generator's device) -> float clips [B, frames, size, size] in [-1, 1].

    Every random parameter comes from ``gen`` in a fixed order (see the module docstring)."""
    dev = imgs_u8.device
    B = imgs_u8.shape[0]

    def rnd(*shape):
        return torch.rand(*shape, generator=gen, device=dev)

    kind = torch.randint(3, (B,), generator=gen, device=dev)  # 0 pan, 1 zoom, 2 move
    si = 0.5 + 0.2 * rnd(B)                                     # item half-size (world units)
    p0 = (rnd(B, 2) * 2 - 1) * 0.4                              # item screen position, start / end
    p1 = (rnd(B, 2) * 2 - 1) * 0.4
    c = (rnd(B, 2) * 2 - 1) * 0.2                               # zoom centre
    za = 0.75 + 0.2 * rnd(B)
    zb = 1.15 + 0.2 * rnd(B)
    zin = rnd(B) < 0.5
    z0, z1 = torch.where(zin, za, zb), torch.where(zin, zb, za)
    amp = bg_max * rnd(B)
    field = rnd(B, 1, 5, 5) * amp[:, None, None, None]

    u = torch.linspace(0.0, 1.0, frames, device=dev)[None, :, None]   # [1, F, 1]
    path = p0[:, None] + u * (p1 - p0)[:, None]                        # [B, F, 2]
    zero2 = torch.zeros_like(path)
    one = torch.ones(B, frames, device=dev)
    zoom = z0[:, None] * (z1 / z0)[:, None] ** u[..., 0]               # [B, F]
    k = kind[:, None, None]
    cam_c = torch.where(k == 0, -path, torch.where(k == 1, c[:, None].expand_as(path), zero2))
    cam_z = torch.where(kind[:, None] == 1, zoom, one)
    item_c = torch.where(k == 2, path, zero2)

    def theta(scale, shift):  # input coords = scale * p + shift (per frame, isotropic)
        t = torch.zeros(B * frames, 2, 3, device=dev)
        t[:, 0, 0] = scale.reshape(-1)
        t[:, 1, 1] = scale.reshape(-1)
        t[:, :, 2] = shift.reshape(-1, 2)
        return t

    out_size = (B * frames, 1, size, size)
    g_item = F.affine_grid(theta(cam_z / si[:, None], (cam_c - item_c) / si[:, None, None]), out_size,
                           align_corners=False)
    g_bg = F.affine_grid(theta(cam_z / 2, cam_c / 2), out_size, align_corners=False)
    src = (imgs_u8.float() / 255.0)[:, None, None].expand(B, frames, 1, *imgs_u8.shape[-2:])
    item = F.grid_sample(src.reshape(B * frames, 1, *imgs_u8.shape[-2:]), g_item, mode="bilinear",
                         padding_mode="zeros", align_corners=False)
    bg = F.grid_sample(field[:, None].expand(B, frames, 1, 5, 5).reshape(B * frames, 1, 5, 5), g_bg,
                       mode="bilinear", padding_mode="reflection", align_corners=False)
    clip = (1 - (1 - item) * (1 - bg)).reshape(B, frames, size, size) * 2 - 1
    return (clip, kind) if return_kind else clip


def to_latent(clips: torch.Tensor) -> torch.Tensor:
    """[B, F, 64, 64] in [-1, 1] -> [B, 16, F, 16, 16] (pixel_unshuffle(4) per frame)."""
    B, Fr, H, W = clips.shape
    x = F.pixel_unshuffle(clips.reshape(B * Fr, 1, H, W), 4)
    return x.reshape(B, Fr, 16, H // 4, W // 4).permute(0, 2, 1, 3, 4).contiguous()


def to_frames(latent: torch.Tensor) -> torch.Tensor:
    """[B, 16, F, h, w] -> [B, F, 1, 4h, 4w] in [-1, 1] (pixel_shuffle(4) per frame)."""
    B, C, Fr, h, w = latent.shape
    x = latent.float().permute(0, 2, 1, 3, 4).reshape(B * Fr, C, h, w)
    return F.pixel_shuffle(x, 4).reshape(B, Fr, 1, 4 * h, 4 * w)


# --------------------------------------------------------------------------- model

def wan_config(args) -> dict:
    if args.dim % 128:
        raise SystemExit(f"--dim {args.dim}: ComfyUI's Wan detection sets num_heads = dim // 128, "
                         "so dim must be a multiple of 128")
    return dict(model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=args.dim, ffn_dim=args.ffn,
                freq_dim=256, text_dim=TEXT_DIM, out_dim=16, num_heads=args.dim // 128, num_layers=args.layers,
                window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)


def build_model(cfg: dict, device) -> torch.nn.Module:
    import comfy.ldm.wan.model
    import comfy.ops
    model = comfy.ldm.wan.model.WanModel(dtype=torch.float32, device=device,
                                         operations=comfy.ops.disable_weight_init, **cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("modulation"):
                p.normal_(0.0, cfg["dim"] ** -0.5)
            elif "norm" in name.split(".")[-2] and name.endswith(".weight"):  # RMSNorm / LayerNorm scales
                p.fill_(1.0)
            elif p.ndim >= 2:
                p.normal_(0.0, 0.02)
            else:
                p.zero_()
        model.head.head.weight.zero_()
        model.head.head.bias.zero_()
    return model


# --------------------------------------------------------------------------- sampling / export

def time_shift(shift: float, t):
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def wan_sigmas(steps: int, shift: float = SAMPLE_SHIFT) -> torch.Tensor:
    """ComfyUI's "simple" schedule of ModelSamplingDiscreteFlow(shift, multiplier 1000), bit for bit:
    the float32 table ``shift((1..1000) / 1000)`` read at ``-(1 + int(i * 1000 / steps))``, then 0."""
    table = time_shift(shift, ((torch.arange(1, 1001, 1) / 1000) * 1000) / 1000)
    ss = len(table) / steps
    sig = [float(table[-(1 + int(i * ss))]) for i in range(steps)] + [0.0]
    return torch.tensor(sig, dtype=torch.float32)


@torch.no_grad()
def sample(fwd, model, class_tokens, labels, gen, device, steps=SAMPLE_STEPS, cfg_scale=SAMPLE_CFG,
           shift=SAMPLE_SHIFT, amp=False, frames=FRAMES, noise=None):
    """Euler + CFG (against the empty class) from x_1 = noise; returns the raw latent [n, 16, F, 16, 16]."""
    n = labels.shape[0]
    x = noise.to(device).float() if noise is not None else \
        torch.randn(n, 16, frames, SIZE // 4, SIZE // 4, generator=gen, device=device)
    lab = torch.cat([labels, torch.full_like(labels, EMPTY)])
    ctx = class_tokens[lab]
    sig = wan_sigmas(steps, shift)
    for i in range(steps):
        t = sig[i].expand(2 * n).to(device) * 1000.0  # ModelSamplingDiscreteFlow.timestep (float32)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            v = fwd(model, torch.cat([x, x]), t, ctx)
        vc, vu = v.float().chunk(2)
        x = x + (float(sig[i + 1]) - float(sig[i])) * (vu + cfg_scale * (vc - vu))
    return x


def save_clip_grid(frames: torch.Tensor, path: Path) -> None:
    """[n, F, 1, H, W] in [-1, 1] -> PNG, one clip per row, frames left to right."""
    n, Fr = frames.shape[:2]
    image_trainer().save_grid(frames.reshape(n * Fr, *frames.shape[2:]), n, path)


def export(args, out: Path, fwd, model, class_tokens, cfg, state, device, amp, data_preview):
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(cfg), "sampling_shift": str(args.sample_shift),
            "sampling": f"euler/simple, {SAMPLE_STEPS} steps, cfg {SAMPLE_CFG}, ModelSamplingSD3 shift "
                        f"{args.sample_shift} (stock Wan 2.1 shift 8.0 is for ~32k-token videos)",
            "data_recipe": DATA_RECIPE, "steps": str(image_trainer().steps_done(state)), "loss": f"{state['loss']:.6f}",
            "version": VERSION, "latent": "(16, 9, 16, 16) raw pixel_unshuffle(4) per 64x64 frame, no temporal "
                                          "compression (EmptyHunyuanLatentVideo 128x128, length 33)",
            "objective": "rectified flow: x_s=(1-s)x0+s*eps, timestep=1000*s, v=eps-x0; s=shift(logit-normal(0,1)) "
                         f"with train shift {args.train_shift}; raw latent (no Wan21 process_latent_in)"}
    image_trainer().save_sharded(sd, out, "video_proxy", meta, args.shard_mib, Path(__file__).name)
    save_file({"class_tokens": class_tokens.detach().to(torch.float16).contiguous().cpu()},
              str(out / "video_proxy_text.safetensors"),
              metadata={"class_names": json.dumps(CLASS_NAMES + ["<empty>"]), "version": VERSION,
                        "usage": "context = class_tokens[label] (4 tokens of 4096); negative = class 10 (empty)"})
    sizes = {p.name: p.stat().st_size for p in sorted(out.glob("video_proxy*.safetensors"))}
    gen = torch.Generator(device=device).manual_seed(0)
    labels = torch.arange(10, device=device).repeat_interleave(args.sample_clips)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    lat = sample(fwd, model, class_tokens, labels, gen, device, steps=args.sample_steps,
                 shift=args.sample_shift, amp=amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_sample = time.perf_counter() - t0
    save_clip_grid(to_frames(lat), out / "samples.png")
    save_clip_grid(data_preview[:, :, None], out / "data.png")
    print(f"[export] {out}: sizes {sizes}; sampled {labels.numel()} clips x {args.sample_steps} steps "
          f"(CFG {SAMPLE_CFG}, shift {args.sample_shift}, batch {2 * labels.numel()}) in {t_sample:.2f} s", flush=True)
    return {"sizes": sizes, "sample_seconds": t_sample}


# --------------------------------------------------------------------------- training

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--dim", type=int, default=256); a("--ffn", type=int, default=1024); a("--layers", type=int, default=5)
    a("--train-shift", type=float, default=1.0, help="training s = shift(logit-normal(0,1))")
    a("--sample-shift", type=float, default=SAMPLE_SHIFT, help="ModelSamplingSD3 shift for sampling")
    a("--sample-clips", type=int, default=2)
    image_trainer().add_run_args(a, batch=128, reserve_s=45.0, sample_steps=SAMPLE_STEPS)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    t_start = time.time()
    args = parse_args(argv)
    if args.merge:
        return {"merged": str(image_trainer().merge_shards(Path(args.merge), "video_proxy"))}
    device, amp = image_trainer().run_device(args)
    fwd = load_wan_forward()

    cfg = wan_config(args)
    torch.manual_seed(args.seed)
    model = build_model(cfg, device)
    class_tokens = torch.nn.Parameter(torch.randn(11, 4, TEXT_DIM, device=device))
    params, n_params, opt, ema, gen, state = image_trainer().training_state(args, model, class_tokens, cfg,
                                                                             device, argv)

    imgs_u8, labels_all = load_data(args)
    imgs_u8, labels_all = imgs_u8.to(device), labels_all.to(device)
    N = imgs_u8.shape[0]
    print(f"[setup] device {device} amp={amp} data {tuple(imgs_u8.shape)} WanModel params {n_params / 1e6:.2f}M "
          f"config {cfg}; {FRAMES}x{SIZE}x{SIZE} clips, latent (16, {FRAMES}, {SIZE // 4}, {SIZE // 4}), "
          f"{FRAMES * (SIZE // 8) ** 2} tokens", flush=True)

    def draw_batch():
        idx = torch.randint(N, (args.batch,), generator=gen, device=device)
        x0 = to_latent(make_clips(imgs_u8[idx], gen))
        lab = labels_all[idx]
        drop = torch.rand(args.batch, generator=gen, device=device) < args.label_drop
        lab = torch.where(drop, torch.full_like(lab, EMPTY), lab)
        t = time_shift(args.train_shift, torch.sigmoid(torch.randn(args.batch, generator=gen, device=device)))
        eps = torch.randn(x0.shape, generator=gen, device=device)
        return x0, lab, t, eps

    def loss_fn(x0, lab, t, eps):
        tt = t[:, None, None, None, None]
        xt = (1 - tt) * x0 + tt * eps
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            v = fwd(model, xt, t * 1000.0, class_tokens[lab])
        return F.mse_loss(v.float(), eps - x0)

    steps_run, run_s = image_trainer().train_loop(
        args, model=model, params=params, ema=ema, opt=opt, gen=gen, class_tokens=class_tokens, cfg=cfg,
        state=state, device=device, t_start=t_start, draw_batch=draw_batch, loss_fn=loss_fn)

    result = {"step": state["step"], "loss": state["loss"], "log": state["log"], "config": cfg,
              "n_params": n_params, "steps_per_s": steps_run / max(run_s, 1e-9)}
    if args.export:
        out = Path(args.export)
        with torch.no_grad():  # EMA weights into the model for export / sampling
            for p, e in zip(params, ema):
                p.copy_(e)
        model.eval()
        # a preview of the training data, from its own generator (the training stream is untouched)
        pg = torch.Generator(device=device).manual_seed(1)
        pidx = torch.randint(N, (12,), generator=pg, device=device)
        preview = make_clips(imgs_u8[pidx], pg)
        result.update(export(args, out, fwd, model, class_tokens, cfg, state, device, amp, preview))
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
