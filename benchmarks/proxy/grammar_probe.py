#!/usr/bin/env python3
"""Which scene grammar can the detail proxy's model learn to draw? A small CPU check.

Why: the detail proxy trained on the ``free`` grammar (any angle, polygons) sampled blobs after
every device session that trained it, and its one-step denoising already lost the outlines at
t = 0.5 (BENCHMARKS.md, section 3; the ``axis`` grammar this probe favoured is what the committed
proxy now learns). A device session is too short to train a candidate grammar at
full size just to find out, so this trains the proxy's own architecture (the trainer's defaults,
the trainer's forward, noise levels and optimiser) from scratch on ``--crop`` x ``--crop`` px crops
of each grammar's scenes, on the CPU, for the same number of steps, and draws what it learned to
denoise: held-out crops noised to t = 0.3 / 0.5 / 0.7 and denoised in one step (x0 = x_t - t v).
Outlines that come back straight at t = 0.5 are what the full-size model must learn first.

The crops (64 px = 8 x 8 tokens of 8 px) test drawing at the token scale, not the layout of a
whole scene; the MSE of different grammars is of different data, so read the pictures first.

    .venv/bin/python benchmarks/proxy/grammar_probe.py --steps 3000 --out /tmp/grammar_probe   # ~17 min, 2 cores

Outputs in ``--out``: ``{grammar}_x0.png`` (rows: held-out crops, then x0 at each t),
``grammar_probe.png`` (those stacked, one block per grammar) and ``grammar_probe.json`` (loss log,
x0 MSE per t, seconds, the command).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import detail_scenes as ds  # noqa: E402
import train_detail_proxy as tdp  # noqa: E402

PROBE_T = (0.3, 0.5, 0.7)


def crops(img: torch.Tensor, n: int, size: int, gen: torch.Generator, fixed: bool = False):
    """``n`` random ``size``-px crops of the scenes ``img`` (fixed: scene i % len for crop i)."""
    idx = torch.arange(n) % len(img) if fixed else torch.randint(len(img), (n,), generator=gen)
    top = torch.randint(0, ds.SIZE - size + 1, (n,), generator=gen)
    left = torch.randint(0, ds.SIZE - size + 1, (n,), generator=gen)
    out = torch.stack([img[i, :, y:y + size, x:x + size] for i, y, x in zip(idx.tolist(), top.tolist(), left.tolist())])
    return out, idx


def train_one(grammar: str, args, fwd, tip) -> dict:
    torch.manual_seed(args.seed)
    cfg = tip.flux_config(tdp.parse_args(args.model_args))
    model = tip.build_model(cfg, "cpu")
    class_tokens = torch.nn.Parameter(torch.randn(11, 4, cfg["context_in_dim"]))
    params = list(model.parameters()) + [class_tokens]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    pool = torch.arange(args.pool)
    pool_img, _ = ds.render_many(pool, grammar=grammar)
    pool_lab = ds.class_of(pool)
    gen = torch.Generator().manual_seed(args.seed)
    log, t0 = [], time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        x, idx = crops(pool_img, args.batch, args.crop, gen)
        batch = tdp.noised_batch(tdp.to_latent(x), pool_lab[idx], gen, 0.1, args.t_shift)  # the trainer's objective
        loss = tdp.flow_loss(fwd, model, class_tokens, *batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            log.append([step + 1, loss.item()])
            print(f"[{grammar}] step {step + 1} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    seconds = time.perf_counter() - t0
    ref = ds.reference_seeds(args.probe_n)
    ref_img, _ = ds.render_many(ref, grammar=grammar)
    pgen = torch.Generator().manual_seed(args.seed + 5)
    x, idx = crops(ref_img, args.probe_n, args.crop, pgen, fixed=True)
    mse = tdp.denoise_probe(fwd, model, class_tokens, x, ds.class_of(ref)[idx], pgen, PROBE_T,
                            Path(args.out) / f"{grammar}_x0.png")
    return {"steps": args.steps, "train_seconds": seconds, "log": log, "x0_mse": mse}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grammar", action="append", choices=ds.GRAMMARS, help="repeatable (default: all)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--crop", type=int, default=64, help="crop side in px (a multiple of 8: whole tokens)")
    p.add_argument("--pool", type=int, default=384, help="training scenes the crops come from")
    p.add_argument("--probe-n", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--t-shift", type=float, default=1.15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--out", required=True)
    p.add_argument("model_args", nargs="*", help="after --: train_detail_proxy model flags, e.g. -- --hidden 32")
    args = p.parse_args(argv)
    if args.crop % 8 or not 8 <= args.crop <= ds.SIZE:
        p.error(f"--crop {args.crop}: a multiple of 8 (one token is 8 px) from 8 to {ds.SIZE}")
    args.grammar = args.grammar or list(ds.GRAMMARS)
    return args


def main(argv=None) -> dict:
    from PIL import Image

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tip = tdp.image_trainer()
    tip.setup_comfyui("cpu")
    fwd = tip.load_flux_forward()
    res = {g: train_one(g, args, fwd, tip) for g in args.grammar}
    blocks = [Image.open(out / f"{g}_x0.png").convert("L") for g in args.grammar]
    sheet = Image.new("L", (max(b.width for b in blocks), sum(b.height + 8 for b in blocks) - 8), 255)
    y = 0
    for b in blocks:
        sheet.paste(b, (0, y))
        y += b.height + 8
    sheet.save(out / "grammar_probe.png")
    report = {"command": " ".join(sys.argv if argv is None else ["grammar_probe.py"] + list(argv)),
              "crop": args.crop, "batch": args.batch, "pool": args.pool, "t": list(PROBE_T), "grammars": res}
    (out / "grammar_probe.json").write_text(json.dumps(report, indent=1))
    for g, r in res.items():
        print(f"{g}: {r['steps']} steps in {r['train_seconds']:.0f} s; one-step x0 MSE "
              + ", ".join(f"t={t} {m:.4f}" for t, m in r["x0_mse"].items()), flush=True)
    return report


if __name__ == "__main__":
    main()
