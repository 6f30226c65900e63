"""The training command (``scripts/train_patch_adapter.py``): a patch adapter for a model, by
self-distillation (training/distill.py); with ``--mode router`` a learned token router for the
Elastic Token Router instead (training/router.py).

One GPU (or CPU)::

    python scripts/train_patch_adapter.py --model benchmarks/proxy/image_provider.py:make_provider \\
        --out models/elastic_tokens/image_proxy_2p.safetensors --factors 2 --steps 2000

Several GPUs of one host (DDP through torchrun; gloo when on CPU)::

    torchrun --standalone --nproc_per_node 4 scripts/train_patch_adapter.py --model ... --out ...

``--model`` picks the model and its prompts:

* ``file.py:factory``: a provider (training/providers.py), e.g. the proxies'
  ``benchmarks/proxy/image_provider.py:make_provider``; the shorthands ``tiny-flux`` / ``tiny-wan``
  (bench/bench_quality.py's tiny models) and ``random:flux`` / ``random:wan`` (FLUX.1-dev / Wan 2.1
  1.3B at real size with random weights, bench/bench_speed.py: time and memory only) name files
  of the benchmarks, loaded by path;
* ``files``: your own model files, as ComfyUI loads them: ``--unet`` (models/diffusion_models),
  ``--clip`` once or twice (models/text_encoders), ``--clip-type flux|wan``, ``--prompts`` (a text
  file, one prompt per line), ``--width/--height/--length``, ``--sample-steps``, ``--cfg``,
  ``--guidance``.

The adapter goes to ``--out`` (put it in ComfyUI's ``models/elastic_tokens/`` and load it with
the "Load Patch Adapter" node). ``--ckpt DIR`` keeps a checkpoint (and the generated pool) there;
``--resume`` continues from it. A summary JSON is written beside the adapter.

For one forced schedule (the node's ``forced_schedule``)::

    python scripts/train_patch_adapter.py --model ... --out ... --schedule 2x19,1x9 --val-every 250

trains only that schedule's coarse steps and, every 250 steps, samples held-out noise through it
and writes the adapter whose samples landed closest to the native model's (the distillation loss
alone did not predict sample quality: BENCHMARKS.md §5).

``--mode pattern`` learns a merge pattern for Token Merge instead (training/pattern.py; no
backpropagation through the model: it samples ``--pool`` rollouts and ``--val-n`` held-out ones,
then fits a per-position embedding for ``--steps`` steps; load the file with "Load Merge Pattern")::

    python scripts/train_patch_adapter.py --mode pattern --model benchmarks/proxy/image_provider.py:make_provider \
        --out models/elastic_tokens/image_proxy_pattern.safetensors --pool 32 --val-n 8 --steps 400
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..ideas.patch.config import parse_forced_schedule
from .distill import TrainConfig, train
from .providers import load_factory

PACK_ROOT = Path(__file__).resolve().parents[1]
# shorthands of --model for the benchmark's providers (loaded by path: the pack never imports them)
MODEL_SHORTHANDS = {
    "tiny-flux": "bench/bench_quality.py:TinyFluxProvider",
    "tiny-wan": "bench/bench_quality.py:TinyWanProvider",
    "random:flux": "bench/bench_speed.py:random_flux_provider",
    "random:wan": "bench/bench_speed.py:random_wan_provider",
}


# ----------------------------------------------------------------------------- providers

class FilesProvider:
    """A user's own model files through ComfyUI's loaders and text encoders."""

    sampler = "euler"
    scheduler = "simple"

    def __init__(self, args):
        if not args.unet or not args.clip or not args.prompts:
            raise SystemExit("--model files needs --unet, --clip (once or twice) and --prompts")
        self.args = args
        self.prompts = [p.strip() for p in Path(args.prompts).read_text().splitlines() if p.strip()]
        if not self.prompts:
            raise SystemExit(f"{args.prompts} holds no prompts")
        self.steps = args.sample_steps or 28
        self.cfg = 1.0 if args.cfg is None else args.cfg
        self._clip = None
        self._cache = {}

    def setup(self, device):
        from .comfy_setup import setup_comfyui

        setup_comfyui(device, verbose=False)

    def load(self):
        import comfy.sd
        import folder_paths

        def path(folder, name):
            return name if os.path.isfile(name) else folder_paths.get_full_path_or_raise(folder, name)

        clip_type = getattr(comfy.sd.CLIPType, self.args.clip_type.upper())
        self._clip = comfy.sd.load_clip(ckpt_paths=[path("text_encoders", c) for c in self.args.clip],
                                        embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                        clip_type=clip_type)
        return comfy.sd.load_diffusion_model(path("diffusion_models", self.args.unet))

    def _encode(self, text):
        if text not in self._cache:
            tokens = self._clip.tokenize(text)
            self._cache[text] = self._clip.encode_from_tokens_scheduled(tokens)
        return self._cache[text]

    def empty_latent(self, batch):
        import torch

        a = self.args
        if a.clip_type == "wan":
            return torch.zeros(batch, 16, (a.length - 1) // 4 + 1, a.height // 8, a.width // 8)
        return torch.zeros(batch, 16, a.height // 8, a.width // 8)

    def conditioning(self, seeds):
        import torch

        prompts = [self.prompts[s % len(self.prompts)] for s in seeds]
        conds = [self._encode(p) for p in prompts]
        ctx = torch.cat([c[0][0] for c in conds])
        extra = dict(conds[0][0][1])
        if isinstance(extra.get("pooled_output"), torch.Tensor):
            extra["pooled_output"] = torch.cat([c[0][1]["pooled_output"] for c in conds])
        if self.args.guidance is not None:
            extra["guidance"] = self.args.guidance
        neg = self._encode("")
        return [[ctx, extra]], [[neg[0][0], dict(neg[0][1])]]


def make_provider(args):
    if args.model == "files":
        return FilesProvider(args)
    spec = MODEL_SHORTHANDS.get(args.model, args.model)
    if spec in MODEL_SHORTHANDS.values():
        spec = str(PACK_ROOT / spec)
    if ":" not in spec:
        raise SystemExit(f"unknown --model {args.model!r}: 'files', a file.py:factory, or one of "
                         f"{sorted(MODEL_SHORTHANDS)}")
    return load_factory(spec)(args)


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", required=True); a("--out", required=True)
    a("--mode", default="adapter", choices=["adapter", "pattern", "router"],
      help="adapter (default): a patch adapter by self-distillation; pattern: a learned merge pattern for "
           "Token Merge (training/pattern.py); router: a learned token router for the Elastic Token Router's "
           "'learned' scorer (training/router.py; uses --steps, --minutes, --batch, --pool, --gen-batch, "
           "--seed, --log-every, --device and the --router-* options)")
    a("--pattern-dim", type=int, default=16, help="pattern: embedding numbers per token position")
    a("--pattern-block", type=int, default=4, help="pattern: side of the local blocks groups stay in (tokens)")
    a("--pattern-video-mode", default="within_frames", choices=["within_frames", "across_frames", "both"],
      help="pattern: the blocks for video (as Token Merge's video_mode)")
    a("--pattern-feature", default="denoised", choices=["denoised", "velocity"],
      help="pattern: what merged tokens should agree on (default: the clean estimate)")
    a("--pattern-lr", type=float, default=0.05); a("--pattern-margin", type=float, default=0.25)
    a("--pattern-proto", type=float, default=1.0, help="pattern: weight of the straight-through prototype loss")
    a("--pattern-max-group", type=int, default=0, help="pattern: largest group (0 = a whole block)")
    a("--pattern-shrink", default="auto", help="pattern: weight (0..1) of the block-average pair distances "
      "against each block's own; auto (default): chosen on two halves of the rollouts")
    a("--pattern-linkage", default="average", choices=["average", "ward"],
      help="pattern: agglomerative linkage (average: LGM's; ward: joins what adds the least within-group variance)")
    a("--router-loss", choices=["rank", "ratio"], default="rank", help="router mode: objective (default rank)")
    a("--router-lr", type=float, default=3e-3, help="router mode: learning rate (default 3e-3)")
    a("--router-width", type=int, default=16, help="router mode: channels of the router network (default 16)")
    a("--router-start", type=float, default=0.2, help="router mode: first sampling percent trained on "
                                                       "(the node's start_percent; default 0.2)")
    a("--router-lags", type=int, default=1, help="router mode: the skip error is the mean over cached velocities "
                                                  "1..N steps old (default 1: the previous step's)")
    a("--router-budgets", default="0.2,0.8", help="router mode, loss ratio: budget range drawn per batch")
    a("--factors", default="2", help="coarse factors to train, e.g. 2 or 2,4")
    a("--rank", type=int, default=32); a("--alpha", type=float, default=None, help="LoRA alpha (default = rank)")
    a("--steps", type=int, default=1000); a("--minutes", type=float, default=None)
    a("--batch", type=int, default=16, help="samples per process (with --guided each is run for cond and uncond)"); a("--lr", type=float, default=1e-3)
    a("--lora-lr", type=float, default=2e-4); a("--warmup", type=int, default=50)
    a("--lr-final", type=float, default=1.0, help="cosine decay to this fraction of the lrs by the end "
                                                  "(of --steps, or of --minutes when given; default 1 = constant)")
    a("--pool", type=int, default=256, help="generated samples (all processes)"); a("--gen-batch", type=int, default=16)
    a("--skip-steps", type=int, default=3, help="first schedule steps not trained on (always native)")
    a("--schedule", default="", help="train for this forced schedule only, e.g. 2x19,1x9: its coarse steps, each "
                                     "at its own patch size (as the node's forced_schedule; overrides --skip-steps)")
    a("--step-weights", default="", help="draw these sampling steps' sigmas more (or less) often, e.g. 2-4:4 "
                                         "(steps 2, 3 and 4 four times as often as the others; steps count from 0)")
    a("--rollout-every", type=int, default=0, help="with --schedule: every N steps roll pool conditionings out "
                                                   "through it with the current student and train on the states "
                                                   "it visits (DAgger-style; default 0 = off)")
    a("--rollout-batch", type=int, default=16, help="samples per rollout (default 16)")
    a("--rollout-share", type=float, default=0.5, help="share of batches drawn from rollout states (default 0.5)")
    a("--rollout-keep", type=int, default=1024, help="rollout states kept per patch size, in CPU memory "
                                                     "(default 1024)")
    a("--val-every", type=int, default=0, help="every N steps, sample --val-n held-out noises through the schedule "
                                               "with the current adapter, measure how far they land from the "
                                               "native samples, and write the best adapter instead of the last "
                                               "(default 0 = off; the loss alone does not predict sample quality)")
    a("--guided", type=float, default=0.0, help="weight (0..1) of the CFG-guided velocity's error in the loss: "
                                                "(1-W) x per-branch MSE + W x MSE of v_u + cfg (v_c - v_u), each "
                                                "batch carrying both branches of --batch samples (default 0; for "
                                                "models sampled with CFG; on the image proxy it did not improve FID)")
    a("--ema", type=float, default=0.0, help="keep an exponential moving average of the adapter with this decay "
                                             "(e.g. 0.999); validation and the written file use it (default 0 = off)")
    a("--val-n", type=int, default=32, help="validation samples (default 32)")
    a("--val-schedule", default="", help="schedule to validate through (default: --schedule), e.g. 2x19,1x9")
    a("--ckpt", default=None); a("--resume", action="store_true"); a("--ckpt-every-s", type=float, default=120.0)
    a("--log-every", type=int, default=25); a("--seed", type=int, default=0)
    a("--device", default=None, help="cuda or cpu (default: cuda if available)")
    # model-specific
    a("--unet"); a("--clip", action="append"); a("--clip-type", default="flux", choices=["flux", "wan"])
    a("--prompts"); a("--width", type=int, default=1024); a("--height", type=int, default=1024)
    a("--length", type=int, default=33); a("--sample-steps", type=int, default=None)
    a("--cfg", type=float, default=None); a("--guidance", type=float, default=None)
    a("--size", type=int, default=None, help="image size for the tiny providers")
    a("--tiny-random", action="store_true", help="random:* at tiny dims (CPU smoke test)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = args.device or ("cuda" if _cuda() else "cpu")
    provider = make_provider(args)
    if args.sample_steps:
        provider.steps = args.sample_steps
    if args.cfg is not None:
        provider.cfg = args.cfg
    provider.setup(device)
    if args.mode == "pattern":
        return _main_pattern(args, provider, device)
    if args.mode == "router":
        return _main_router(args, provider, device)
    cfg = TrainConfig(factors=tuple(int(k) for k in args.factors.split(",")), rank=args.rank,
                      alpha=float(args.alpha if args.alpha is not None else args.rank), steps=args.steps,
                      minutes=args.minutes, batch=args.batch, lr=args.lr, lora_lr=args.lora_lr,
                      warmup=args.warmup, lr_final=args.lr_final, pool=args.pool, gen_batch=args.gen_batch,
                      skip_steps=args.skip_steps, schedule=parse_forced_schedule(args.schedule),
                      rollout_every=args.rollout_every, rollout_batch=args.rollout_batch,
                      rollout_share=args.rollout_share, rollout_keep=args.rollout_keep,
                      step_weights=parse_step_weights(args.step_weights), val_every=args.val_every, val_n=args.val_n, val_schedule=parse_forced_schedule(args.val_schedule),
                      guided=args.guided, ema=args.ema,
                      seed=args.seed, log_every=args.log_every, ckpt=args.ckpt, ckpt_every_s=args.ckpt_every_s,
                      resume=args.resume)
    summary = train(provider, cfg, args.out, device=device, log=lambda m: print(m, flush=True))
    summary["command"] = " ".join(sys.argv)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).with_suffix(".json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2), flush=True)
    return summary


def _main_pattern(args, provider, device) -> dict:
    from .pattern import PatternConfig, train_pattern

    import torch

    torch.manual_seed(args.seed)
    cfg = PatternConfig(dim=args.pattern_dim, block=args.pattern_block, video_mode=args.pattern_video_mode,
                        feature=args.pattern_feature, max_group=args.pattern_max_group, linkage=args.pattern_linkage,
                        shrink=None if args.pattern_shrink == "auto" else float(args.pattern_shrink),
                        samples=args.pool,
                        val_samples=args.val_n, gen_batch=args.gen_batch, steps=args.steps, lr=args.pattern_lr,
                        margin=args.pattern_margin, proto=args.pattern_proto, seed=args.seed,
                        log_every=args.log_every)
    summary = train_pattern(provider, cfg, args.out, device=device, log=lambda m: print(m, flush=True),
                            ckpt=args.ckpt, resume=args.resume)
    summary["command"] = " ".join(sys.argv)
    Path(args.out).with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return summary


def _main_router(args, provider, device) -> dict:
    from .router import RouterTrainConfig, train_router

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("--mode router runs in one process (it trains a tiny network): run it without torchrun")
    try:
        budgets = tuple(float(b) for b in args.router_budgets.split(","))
    except ValueError:
        raise SystemExit(f"--router-budgets: expected LOW,HIGH, got {args.router_budgets!r}") from None
    cfg = RouterTrainConfig(steps=args.steps, minutes=args.minutes, batch=args.batch, lr=args.router_lr,
                            pool=args.pool, gen_batch=args.gen_batch, width=args.router_width,
                            loss=args.router_loss, budgets=budgets, start_percent=args.router_start, lags=args.router_lags,
                            seed=args.seed, log_every=args.log_every)
    summary = train_router(provider, cfg, args.out, device=device, log=lambda m: print(m, flush=True))
    summary["command"] = " ".join(sys.argv)
    Path(args.out).with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2), flush=True)
    return summary


def parse_step_weights(text: str) -> dict[int, float]:
    """``"2-4:4, 7:0.5"`` -> ``{2: 4.0, 3: 4.0, 4: 4.0, 7: 0.5}``."""
    out: dict[int, float] = {}
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        try:
            steps, weight = part.split(":")
            first, _, last = steps.partition("-")
            for i in range(int(first), int(last or first) + 1):
                out[i] = float(weight)
        except ValueError:
            raise ValueError(f"--step-weights: {part!r} is not STEP:WEIGHT or FIRST-LAST:WEIGHT") from None
    return out


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
