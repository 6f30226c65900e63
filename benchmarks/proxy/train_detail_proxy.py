#!/usr/bin/env python3
"""Train the DETAIL proxy: ComfyUI's own Flux class on procedural scenes with real detail (resumable).

Purpose (issue 16): the Fashion-MNIST proxies are upsampled 28x28 images, so every token is a
smooth interpolation and dropping or merging tokens looks free there. This proxy learns 256x256
scenes (``detail_scenes.py``) of flat shapes over smooth gradients beside textures of period 2-8 px,
i.e. detail INSIDE one token, at 1024 image tokens per sample, with a known per-pixel detail map.

Everything but the data and the sizes is the image proxy's recipe, reused from
``train_image_proxy.py`` (same code, imported): ComfyUI's ``comfy.ldm.flux.model.Flux`` trained
through ``families/autograd_forward.flux_forward``; the init; class conditioning through the text
path (a learned ``class_tokens`` table [11, 4, ctx], index 10 = empty for CFG, labels dropped with
p 0.1, pooled vector = token mean, guidance input 1.0); rectified flow (x_t = (1-t) x0 + t eps,
timestep t, v = eps - x0, t ~ logit-normal(0, 1) shifted by ``--t-shift``, below); AdamW with linear
warm-up, grad clip 1.0, bf16 autocast on CUDA, EMA 0.999; one generator on the training device for
all randomness, saved in the resumable checkpoint (``--ckpt`` / ``--resume``, ``--minutes``
deadline); export format (fp16, ComfyUI key names with the released QK-norm names, metadata
``config``).

Data: every batch is rendered on the training device from ``--batch`` fresh seeds drawn from the
training stream [0, 10^9) (``detail_scenes.train_seeds``; the FID reference stream 10^9 + i is never
drawn); class = seed % 10 (texture family x layout, see detail_scenes). Image [-1, 1] 256x256 ->
``pixel_unshuffle(4)`` -> a raw 16x64x64 latent (lossless; decode = ``pixel_shuffle(4)``). In
ComfyUI that is what ``EmptySD3LatentImage`` gives for 512x512; Flux's patch 2 makes it 32x32 = 1024
image tokens, each covering 8x8 pixels of the scene. As for the image proxy, the latent is raw (no
FLUX ``process_latent_in``): ``detail_provider.py`` undoes ``process_latent_out`` when decoding.

Model (defaults): Flux in/out 16 ch, patch 2, hidden 96, 2 heads (head dim 48, RoPE axes
[8, 20, 20]), 2 double + 6 single blocks, mlp_ratio 4, ctx/vec dim 128, qkv_bias, guidance_embed:
1.64M parameters, 3.1 MiB in fp16 (one file; hidden 96 rather than 128 keeps the tracked tree under
its 60 MiB budget beside the two Fashion-MNIST proxies and their adapters). Optimisation for a ~6 minute H200 run: batch 64
(65.5k image tokens a step), lr 5e-4 after 300 warm-up steps (a narrow model takes a larger rate than
the image proxy's 3e-4 at hidden 256), progress line every 100 steps.

Training noise levels (``--t-shift MU``, default 1.15): t = FLUX's time shift of a logit-normal draw,
e^MU / (e^MU + 1/u - 1) with u = sigmoid(N(0, 1)), the same shift as the sampler's ModelSamplingFlux
below, so training spends its steps at the noise levels sampling visits: a 256x256 scene is a
full-resolution image (unlike the image proxy's upsampled 28x28 ones), whose layout forms at high
noise (the SD3 resolution-dependent shift). ``--t-shift 0`` is the first recipe, which the first
(``free``-grammar) weights were trained with.

Sampler for ``samples.png``: Euler, 28 steps, ComfyUI's "simple" schedule of ModelSamplingFlux
(shift 1.15, ``train_image_proxy.flux_sigmas``), CFG 3 against the empty class; 10 rows (classes)
x ``--sample-cols``. ``data.png``: 8 training-stream scenes (top) and their detail maps (bottom).

Scene grammar (``--grammar``, default ``axis``, stored in the export's metadata ``grammar`` so the
benchmark's held-out set is drawn from the same grammar): ``axis`` snaps every angle to the pixel
grid (detail_scenes), so a model this small learns to draw the outlines within one device session;
at ``free`` (any angle, polygons) the same model sampled blobs after 6,000 steps (BENCHMARKS.md,
section 3).

Outputs of ``--export DIR`` (7 files with the tee'd stdout, each far below 16 MiB):
``detail_proxy.safetensors`` (EMA Flux weights fp16; metadata ``config`` and
``elastic_tokens_test_config`` (the Flux kwargs), ``data_recipe``, ``steps``, ``loss``, ``version``,
``image_size``, ``latent``), ``detail_proxy_text.safetensors`` (``class_tokens`` fp16 [11, 4, ctx],
metadata ``class_names``), ``samples.png``, ``data.png``, ``denoise.png`` (held-out scenes and the
model's one-step x0 from them at t = 0.5 / 0.7 / 0.9: ``denoise_probe``), ``train_log.json``.

Commands
--------
  # GPU machine (carry [".whl"]; no data to carry: scenes are generated), one command < 10 minutes;
  # a warm start from the committed proxy, as its recipe (BENCHMARKS.md, section 3):
  set -o pipefail; . scripts/device_env.sh && python3 benchmarks/proxy/train_detail_proxy.py --minutes 9 \\
      --init benchmarks/proxy/detail_proxy.safetensors --batch 256 --lr 5e-4 --warmup 200 \\
      --ckpt /tmp/detail_ckpt.pt --export $OUT 2>&1 | tee $OUT/train_stdout.txt && cp $OUT/detail_proxy*.safetensors /tmp/
  # (7 files in $OUT; the copies in /tmp serve a following bench_quality call on the same warm machine
  #  through ELASTIC_TOKENS_DETAIL_WEIGHTS=/tmp/detail_proxy.safetensors)
  # continue on the same (still warm) machine:  ... --resume /tmp/detail_ckpt.pt --ckpt /tmp/detail_ckpt.pt
  # here: cp OUT/detail_proxy*.safetensors benchmarks/proxy/
  # CPU smoke test: .venv/bin/python benchmarks/proxy/train_detail_proxy.py --hidden 32 --heads 2 \\
  #     --depth 1 --single 1 --ctx-dim 16 --batch 2 --max-steps 5 --sample-steps 2 --export /tmp/detail_out
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # sibling proxy modules (train_image_proxy, detail_scenes)
    sys.path.insert(0, str(HERE))

import detail_scenes as ds  # noqa: E402

VERSION = "elastic-tokens detail-proxy v2 (benchmarks/proxy/train_detail_proxy.py)"
STEM = "detail_proxy"
EMPTY = 10
LATENT_SHAPE = (16, ds.SIZE // 4, ds.SIZE // 4)
CLASS_NAMES = [f"{ds.FAMILIES[c % 5]}, {'3-5 large' if c < 5 else '6-10 small'} shapes" for c in range(10)]
DATA_RECIPE = ("procedural scenes (benchmarks/proxy/detail_scenes.py): 256x256 gray, flat rectangles/ellipses/"
               "convex polygons over a smooth gradient, 70% of shapes textured (stripes/checker/value noise/"
               "grating, period 2-8 px, random angle; grammar 'axis': rectangles and ellipses, every angle 0 or "
               "90 degrees); training seeds [0, 1e9), class = seed % 10; [-1,1] -> "
               "pixel_unshuffle(4) = 16x64x64 raw latent (no Flux latent scaling); decode = pixel_shuffle(4)")
DENOISE_T = (0.5, 0.7, 0.9)  # noise levels of the export's denoising probe (denoise.png)


def image_trainer():
    """benchmarks/proxy/train_image_proxy.py as a module (model, training loop, export helpers)."""
    import train_image_proxy  # benchmarks/proxy is on sys.path (see the top of this file)

    return train_image_proxy


def to_latent(img: torch.Tensor) -> torch.Tensor:
    """[B, 1, 256, 256] in [-1, 1] -> [B, 16, 64, 64]."""
    return F.pixel_unshuffle(img, 4)


def to_image(latent: torch.Tensor) -> torch.Tensor:
    """[B, 16, 64, 64] -> [B, 1, 256, 256] in [-1, 1] (unclamped)."""
    return F.pixel_shuffle(latent.float(), 4)


@torch.no_grad()
def sample(fwd, model, class_tokens, labels, gen, device, steps=28, cfg_scale=3.0, amp=False, noise=None):
    """Euler + CFG against the empty class from x_1 = noise (the image proxy's sampler at this
    latent shape); returns the raw latent [n, 16, 64, 64]."""
    n = labels.shape[0]
    x = noise.to(device).float() if noise is not None else torch.randn(n, *LATENT_SHAPE, generator=gen,
                                                                        device=device)
    lab = torch.cat([labels, torch.full_like(labels, EMPTY)])
    ctx = class_tokens[lab]
    sig = image_trainer().flux_sigmas(steps).tolist()
    for i in range(steps):
        t = torch.full((2 * n,), sig[i], device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            v = fwd(model, torch.cat([x, x]), t, ctx, y=ctx.mean(1), guidance=torch.ones_like(t))
        vc, vu = v.float().chunk(2)
        x = x + (sig[i + 1] - sig[i]) * (vu + cfg_scale * (vc - vu))
    return x


def shifted_t(u: torch.Tensor, t_shift: float) -> torch.Tensor:
    """u in (0, 1) under the sampler's time shift (``train_image_proxy.flux_time_shift``, the one
    ``flux_sigmas`` uses): moves training noise levels towards pure noise as the sampler's schedule
    does; t_shift 0 is the v1 draw itself, bit for bit."""
    if t_shift == 0:
        return u
    return image_trainer().flux_time_shift(u, t_shift)


def noised_batch(x0: torch.Tensor, lab: torch.Tensor, gen: torch.Generator, label_drop: float, t_shift: float):
    """The objective's random draws for clean latents ``x0`` of classes ``lab``, from ``gen`` in this
    order: labels dropped to the empty class with p ``label_drop`` (for CFG), noise levels t
    (logit-normal, shifted by ``t_shift``), noise eps. Returns (x0, labels, t, eps); shared by the
    trainer and ``grammar_probe.py``, so both train the same objective."""
    n, dev = x0.shape[0], x0.device
    drop = torch.rand(n, generator=gen, device=dev) < label_drop
    lab = torch.where(drop, torch.full_like(lab, EMPTY), lab)
    t = shifted_t(torch.sigmoid(torch.randn(n, generator=gen, device=dev)), t_shift)
    eps = torch.randn(x0.shape, generator=gen, device=dev)
    return x0, lab, t, eps


def flow_loss(fwd, model, class_tokens, x0, lab, t, eps, amp: bool = False) -> torch.Tensor:
    """Rectified-flow loss of one noised batch: x_t = (1 - t) x0 + t eps, target v = eps - x0,
    class tokens of ``lab`` on the text path, pooled vector = their mean, guidance input 1.0."""
    xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
    ctx = class_tokens[lab]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        v = fwd(model, xt, t, ctx, y=ctx.mean(1), guidance=torch.ones_like(t))
    return F.mse_loss(v.float(), eps - x0)


def file_meta(cfg: dict, state: dict) -> dict:
    cfg_json = json.dumps(cfg)
    return {"config": cfg_json, "elastic_tokens_test_config": cfg_json, "data_recipe": DATA_RECIPE,
            "steps": str(image_trainer().steps_done(state)), "loss": f"{state['loss']:.6f}", "version": VERSION,
            "image_size": str(ds.SIZE), "latent": "16x64x64 raw pixel_unshuffle(4) (EmptySD3LatentImage 512x512)",
            "objective": "rectified flow: x_t=(1-t)x0+t*eps, timestep=t, v=eps-x0; guidance input 1.0; "
                         "raw latent (no process_latent_in)",
            "t_shift": str(state.get("t_shift", 0.0)),  # of the last run (0.0: v1, before the option)
            "grammar": state.get("grammar", "free")}  # detail_scenes grammar of the last run


def export(args, out: Path, fwd, model, class_tokens, cfg, state, device, amp):
    from safetensors.torch import save_file
    tip = image_trainer()
    out.mkdir(parents=True, exist_ok=True)
    sd = tip.file_names({k: v.detach().to(torch.float16).contiguous().cpu() for k, v in model.state_dict().items()})
    tip.save_sharded(sd, out, STEM, file_meta(cfg, state), args.shard_mib, Path(__file__).name)
    save_file({"class_tokens": class_tokens.detach().to(torch.float16).contiguous().cpu()},
              str(out / f"{STEM}_text.safetensors"),
              metadata={"class_names": json.dumps(CLASS_NAMES + ["<empty>"]), "version": VERSION,
                        "usage": "context = class_tokens[label] (4 tokens), y = context.mean(1), guidance 1.0"})
    sizes = {p.name: p.stat().st_size for p in sorted(out.glob(f"{STEM}*.safetensors"))}
    gen = torch.Generator(device=device).manual_seed(0)
    labels = torch.arange(10, device=device).repeat_interleave(args.sample_cols)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    lat = sample(fwd, model, class_tokens, labels, gen, device, steps=args.sample_steps, amp=amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_sample = time.perf_counter() - t0
    tip.save_grid(to_image(lat), 10, out / "samples.png")
    ds.save_preview(torch.arange(8), out / "data.png", grammar=state["grammar"])  # training seeds 0..7, detail maps
    ref = ds.reference_seeds(8)  # held-out scenes
    denoise_mse = denoise_probe(fwd, model, class_tokens, ds.render(ref.to(device), grammar=state["grammar"])[0],
                                ds.class_of(ref).to(device), torch.Generator(device=device).manual_seed(1),
                                DENOISE_T, out / "denoise.png", amp)
    print(f"[export] {out}: sizes {sizes}; sampled {labels.numel()} images x {args.sample_steps} steps "
          f"(CFG 3, batch {2 * labels.numel()}) in {t_sample:.2f} s", flush=True)
    print("[export] denoising probe (x0 from one step at t, 8 held-out scenes): MSE "
          + ", ".join(f"t={t} {m:.4f}" for t, m in denoise_mse.items()), flush=True)
    return {"sizes": sizes, "sample_seconds": t_sample, "denoise_mse": denoise_mse}


def denoise_probe(fwd, model, class_tokens, img, labels, gen, ts, path, amp=False) -> dict:
    """x0 predicted in ONE step from the images ``img`` ([n, 1, H, W] in [-1, 1], classes
    ``labels``) noised to each t of ``ts`` (x0 = x_t - t v; one noise draw from ``gen``): whether the
    model can draw the scenes' outlines at all once the layout is given, apart from sampling: a
    denoiser that knows straight edges keeps them at t = 0.5, and one that does not samples blobs
    whatever the sampler (BENCHMARKS.md, section 3). Writes ``path`` (rows: the images, then x0 at
    each t) and returns {str(t): MSE of x0 in latent units}. The export's probe and
    ``grammar_probe.py``'s."""
    x0 = to_latent(img)
    ctx = class_tokens[labels]
    eps = torch.randn(x0.shape, generator=gen, device=x0.device)
    rows, mse = [img.float().cpu()], {}
    with torch.no_grad():
        for t in ts:
            tt = torch.full((x0.shape[0],), t, device=x0.device)
            xt = (1 - t) * x0 + t * eps
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                v = fwd(model, xt, tt, ctx, y=ctx.mean(1), guidance=torch.ones_like(tt))
            xh = xt - t * v.float()
            mse[str(t)] = float(F.mse_loss(xh, x0))
            rows.append(to_image(xh).clamp(-1, 1).cpu())
    image_trainer().save_grid(torch.cat(rows), len(rows), path)
    return mse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--hidden", type=int, default=96); a("--heads", type=int, default=2)
    a("--depth", type=int, default=2); a("--single", type=int, default=6); a("--ctx-dim", type=int, default=128)
    a("--sample-cols", type=int, default=4)
    a("--grammar", choices=ds.GRAMMARS, default="axis", help="scene grammar (detail_scenes): axis = rectangles and "
      "ellipses, every angle 0 or 90 degrees (the committed proxy's); free = any angle, polygons too")
    a("--t-shift", type=float, default=1.15, help="FLUX time shift (mu) of the training noise levels; the "
      "sampler's ModelSamplingFlux shift is 1.15; 0 = unshifted logit-normal (the v1 recipe)")
    image_trainer().add_run_args(a, batch=64, reserve_s=45.0, sample_steps=28)  # --data/--synthetic: unused
    p.set_defaults(lr=5e-4, warmup=300)
    return p.parse_args(argv)


def default_config() -> dict:
    """The Flux kwargs of the default detail proxy (what ``make_random_provider`` builds without a file)."""
    return image_trainer().flux_config(parse_args([]))


def main(argv=None) -> dict:
    t_start = time.time()
    args = parse_args(argv)
    tip = image_trainer()
    if args.merge:
        return {"merged": str(tip.merge_shards(Path(args.merge), STEM))}
    device, amp = tip.run_device(args)
    fwd = tip.load_flux_forward()

    cfg = tip.flux_config(args)
    torch.manual_seed(args.seed)
    model = tip.build_model(cfg, device)
    class_tokens = torch.nn.Parameter(torch.randn(11, 4, args.ctx_dim, device=device))
    params, n_params, opt, ema, gen, state = tip.training_state(args, model, class_tokens, cfg, device, argv)
    state["t_shift"] = args.t_shift
    state["grammar"] = args.grammar
    print(f"[setup] device {device} amp={amp} Flux params {n_params / 1e6:.2f}M config {cfg}; scenes "
          f"{ds.SIZE}x{ds.SIZE}, latent {LATENT_SHAPE}, {(ds.SIZE // 8) ** 2} image tokens; batch {args.batch} "
          f"lr {args.lr} warmup {args.warmup} t-shift {args.t_shift} grammar {args.grammar}", flush=True)

    def draw_batch():
        seeds = ds.train_seeds(gen, args.batch, device)
        img, _ = ds.render(seeds, grammar=args.grammar)
        return noised_batch(to_latent(img), ds.class_of(seeds), gen, args.label_drop, args.t_shift)

    def loss_fn(x0, lab, t, eps):
        return flow_loss(fwd, model, class_tokens, x0, lab, t, eps, amp)

    steps_run, run_s = tip.train_loop(args, model=model, params=params, ema=ema, opt=opt, gen=gen,
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
               "denoise_mse": result["denoise_mse"], "grammar": args.grammar, "t_shift": args.t_shift,
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "data_recipe": DATA_RECIPE, "version": VERSION, "log": state["log"]}
        (out / "train_log.json").write_text(json.dumps(log, indent=1))
    print(f"[done] total wall {time.time() - t_start:.1f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
