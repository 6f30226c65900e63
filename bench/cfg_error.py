#!/usr/bin/env python3
"""How much does classifier-free guidance amplify a coarse step's error?

The sampler steps with ``v_u + s (v_c - v_u)``, so a coarse step's errors on the two branches
become ``e_u + s (e_c - e_u)``: where they are correlated the guided error is about the branch
error, where they are not it is up to ``s^2 + (s-1)^2`` times larger. This follows the model's
own native trajectory (Euler, the provider's CFG, ``--n`` seeds) and, at every coarse step of
``--schedule``, evaluates the adapter's coarse step (the trainer's student, training/distill.py)
against the native model on both branches. It prints per step the branch MSEs, the guided MSE,
their ratio and the branches' error correlation. On the image proxy (CFG 3) the ratio was 4-7.5
at sigma 0.99-0.89 (BENCHMARKS.md §5), which motivated ``--guided`` in the trainer; training on
the guided error did not improve FID there.

    python bench/cfg_error.py --model benchmarks/proxy/image_provider.py:make_provider \\
        --adapter benchmarks/proxy/adapters/image_proxy_adapter_2x19.safetensors --schedule 2x19,1x9 --n 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "bench", REPO / "tests" / "support"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a bench/bench_quality.py model provider")
    p.add_argument("--adapter", required=True, help="patch adapter (.safetensors) whose coarse steps are measured")
    p.add_argument("--schedule", required=True, help="forced schedule; its coarse steps are measured, e.g. 2x19,1x9")
    p.add_argument("--n", type=int, default=16, help="seeds 0..n-1 (default 16)")
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the provider's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--size", type=int, default=None, help="image size for the tiny providers")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    import bench_quality

    provider = bench_quality.make_model_provider(args.model, args)
    if args.cfg is not None:
        provider.cfg = args.cfg
    provider.setup(args.device)
    import comfy_runtime

    comfy_runtime.load_pack()
    import torch
    from elastic_tokens.training import distill as training
    from elastic_tokens.ideas.patch.adapter_file import load_adapter
    from elastic_tokens.training.rollouts import cfg_entries
    from elastic_tokens.ideas.patch.config import parse_forced_schedule

    schedule = parse_forced_schedule(args.schedule)
    if not any(k > 1 for k in schedule):
        raise ValueError(f"schedule {args.schedule!r} has no coarse step to measure")
    model = provider.load()
    sigmas, _ = training._sampling_sigmas(provider, model)
    training._fits(schedule, sigmas)
    device = torch.device(args.device)
    dtype = model.model.get_dtype() if device.type == "cuda" else torch.float32
    seeds = list(range(args.n))
    with torch.no_grad():
        _, conds = training.generate_pool(provider, model, seeds, args.n, lambda *a: None)
    if cfg_entries(conds, float(provider.cfg)) != 2:
        raise ValueError(f"the model samples without CFG (cfg {provider.cfg:g}): nothing to amplify")
    student = training.student_with(model, load_adapter(args.adapter), device)
    branches = [training._stack([conds[i][j] for i in seeds], device, dtype) for j in (0, 1)]
    scale = float(provider.cfg)
    x = float(sigmas[0]) * torch.randn((args.n, *provider.empty_latent(1).shape[1:]),
                                       generator=torch.Generator().manual_seed(123)).to(device)
    rows = []
    print(f"{'step':>4} {'sigma':>6} {'factor':>6} {'mse cond':>9} {'mse uncond':>10} {'mse guided':>10} "
          f"{'ratio':>6} {'corr':>5}")
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            s = float(sigmas[i])
            sig = torch.full((args.n,), s, device=device)
            native = [student.teacher(x.to(dtype), sig, c).float() for c in branches]
            factor = schedule[i] if i < len(schedule) else 1
            if factor > 1:
                coarse = [student(x.to(dtype), sig, c, factor).float() for c in branches]
                ec, eu = coarse[0] - native[0], coarse[1] - native[1]
                eg = eu + scale * (ec - eu)
                mc, mu, mg = (float(e.pow(2).mean()) for e in (ec, eu, eg))
                corr = float((ec * eu).sum() / (ec.norm() * eu.norm()).clamp_min(1e-30))
                rows.append({"step": i, "sigma": s, "factor": factor, "mse_cond": mc, "mse_uncond": mu,
                             "mse_guided": mg, "ratio": mg / (0.5 * (mc + mu)), "corr": corr})
                r = rows[-1]
                print(f"{i:>4} {s:>6.3f} {factor:>5}p {mc:>9.5f} {mu:>10.5f} {mg:>10.5f} {r['ratio']:>6.2f} "
                      f"{corr:>5.2f}", flush=True)
            velocity = native[1] + scale * (native[0] - native[1])
            x = x + (float(sigmas[i + 1]) - s) * velocity
    return rows


if __name__ == "__main__":
    main()
