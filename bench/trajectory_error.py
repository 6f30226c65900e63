#!/usr/bin/env python3
"""Where along a schedule do coarse steps cost quality? The trajectory error of forced schedules.

Samples ``--n`` seeds natively and through each forced schedule (the Dynamic Patch Schedule node
through ComfyUI's KSampler, with ``--adapter`` attached as Load Patch Adapter does; the seeds' noise
as bench/bench_quality.py makes it) and prints, per schedule, the token-FLOP reduction, the mean
squared difference of the decoded images to the native ones, and the share of that difference
that survives averaging over squares of 1/8 and 1/16 of the image height (shape, not detail). Schedules differing in
one segment isolate that segment's cost: on the image proxy, steps 2-4 of 28 make most of
``2x19,1x9``'s error (BENCHMARKS.md §5). The error is against the full model's own images, not
against real data: it tracks FID across adapters there, but it is not FID.

    python bench/trajectory_error.py --model benchmarks/proxy/image_provider.py:make_provider \\
        --adapter benchmarks/proxy/adapters/image_proxy_adapter_2x19.safetensors --n 32 \\
        --schedules "2x19,1x9;2x2,1x26;1x2,2x3,1x23;2x2,1x3,2x17,1x6"
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
    p.add_argument("--model", required=True, help="a bench/bench_quality.py model provider, e.g. tiny-flux or "
                                                   "benchmarks/proxy/image_provider.py:make_provider")
    p.add_argument("--schedules", required=True, help="forced schedules separated by ';', e.g. '2x19,1x9;2x2,1x26'")
    p.add_argument("--adapter", default=None, help="patch adapter (.safetensors) attached for every schedule")
    p.add_argument("--n", type=int, default=32, help="seeds 0..n-1 (default 32)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--size", type=int, default=None, help="image size for the tiny providers")
    return p.parse_args(argv)


def sample(provider, model, seeds: list[int], batch: int):
    """Decoded images (float, NCHW) of ``seeds`` through KSampler with ``model``."""
    import bench_quality
    import comfy.sample
    import torch

    out = []
    for i in range(0, len(seeds), batch):
        part = seeds[i:i + batch]
        latent = comfy.sample.fix_empty_latent_channels(model, provider.empty_latent(len(part)))
        positive, negative = provider.conditioning(part)
        with torch.inference_mode():
            x = comfy.sample.sample(model, bench_quality.initial_noise(latent[:1], part, 0.0), provider.steps,
                                    provider.cfg, provider.sampler, provider.scheduler, positive, negative, latent,
                                    disable_pbar=True, seed=part[0])
            out.append(provider.decode(x).float().cpu())
    return torch.cat(out)


def coarse_share(diff, fraction: int) -> float:
    """Share of ``diff``'s mean square left after averaging over squares of 1/``fraction`` of the
    image height (what differs in shapes that large, not in detail)."""
    import torch.nn.functional as F

    planes = diff.flatten(0, -3).unsqueeze(1)  # any leading dims (batch, channels, frames)
    low = F.avg_pool2d(planes, max(1, diff.shape[-2] // fraction))
    return float((low ** 2).mean() / (diff ** 2).mean().clamp_min(1e-20))


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    import bench_quality

    provider = bench_quality.make_model_provider(args.model, args)
    provider.setup(args.device)
    import comfy_runtime

    comfy_runtime.load_pack()
    from elastic_tokens import last_run_report
    from elastic_tokens.ideas.patch import apply_patch_schedule
    from elastic_tokens.ideas.patch.config import PatchScheduleConfig

    schedules = [s.strip() for s in args.schedules.split(";") if s.strip()]
    configs = [PatchScheduleConfig(forced_schedule=s) for s in schedules]  # bad text fails before sampling
    model = provider.load()
    seeds = list(range(args.n))
    native = sample(provider, model, seeds, args.batch)
    base = bench_quality.attach_adapter(model, args.adapter) if args.adapter else model
    rows = []
    print(f"{'schedule':24s} {'FLOP red.':>9s} {'MSE':>9s} {'>=1/8':>6s} {'>=1/16':>6s}   (n = {args.n}, "
          f"{provider.steps} steps{', adapter ' + Path(args.adapter).name if args.adapter else ', training-free'})")
    for text, config in zip(schedules, configs):
        patched = apply_patch_schedule(base, config)
        images = sample(provider, patched, seeds, args.batch)
        report = last_run_report(patched)
        diff = images - native
        row = {"schedule": text, "flop_reduction": float(report.flops_native / report.flops_used),
               "mse": float((diff ** 2).mean()), "share_1_8": coarse_share(diff, 8),
               "share_1_16": coarse_share(diff, 16)}
        rows.append(row)
        print(f"{text:24s} {row['flop_reduction']:8.2f}x {row['mse']:9.5f} {row['share_1_8']:6.0%} "
              f"{row['share_1_16']:6.0%}", flush=True)
    return rows


if __name__ == "__main__":
    main()
