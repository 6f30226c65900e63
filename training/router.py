"""Training the learned token router (``--mode router`` of scripts/train_patch_adapter.py).

No backpropagation through the transformer: the frozen model samples a pool of seeds densely
through ComfyUI's own sampler (the provider's sampler, steps and CFG), and at every step of the
routing window we record, per image token,

* the router's inputs (ideas/drop/router_net.router_features: the last two latents, exactly what
  the planner has when it plans that step), and
* the error skipping it would cause under the RAS cache fill: ``err_i = || v_t,i - v_cached,i ||^2``
  over the token's patch, with ``v`` the guided velocity ``(x - denoised) / sigma`` the sampler
  used and ``v_cached`` the token's velocity at the previous step.

Then only the tiny router network trains on those records (seconds per hundred steps on a CPU).

Objective. The router is used *elastically*: the node keeps the top-``budget`` tokens of one
ordering, for whatever budget the user sets. What matters is therefore the ordering, at every
budget at once; the measure is the share of the step's skip error the kept tokens cover,
``captured(b) = sum_{i in top-b} err_i / sum_i err_i`` on held-out seeds. Two losses:

* ``rank`` (default): ListNet, the cross-entropy between ``softmax(logits)`` and the error
  distribution ``err / sum(err)`` of the step. Its optimum is ``logit = log err + const``, the
  perfect ordering for every budget at once, and it weighs tokens by their error (a mis-ordered
  pair of low-error tokens costs almost nothing, as it does at sampling time). The planner then
  uses the same softmax as its score (averaged over a batch's samples).
* ``ratio``: DC-DiT's recipe made elastic: per batch a budget ``b`` is drawn from ``--budgets``;
  ``p = sigmoid(logit - q_b)`` with ``q_b`` the logits' ``(1-b)`` quantile (a soft top-b);
  loss = expected skipped error ``sum (1 - p) err / sum err`` + the ratio loss
  ``((1-F)(1-G) + F G (N-1)) N / (N-1)`` (``F`` the hard kept share, ``G`` the mean ``p``,
  ``N = 1/b``) towards the budget. Only the tokens near each budget's threshold get gradient.

Both are measured on held-out seeds after training (``captured`` at 0.3 and 0.5, beside the
``ras`` and ``context`` scorers' orderings of the same steps and the oracle); the summary and the
file's metadata keep the numbers. On the image proxy the two ordered about equally well (``ratio``
a little ahead on one rollout set, ``rank`` on another), both far ahead of ``ras``. ``rank`` is
the default because only it gives the logits a scale: ``exp(logit / 2)`` estimates the token's
RMS velocity drift per step, which the planner multiplies by the age of the token's cached output
(ideas/drop/planner.py); that product, not the order alone, is what made the learned router beat
``ras`` in sampled images. ``ratio``'s logits only order tokens around each budget's threshold.

``--router-lags N`` averages the target over cached velocities 1..N steps old instead (on the
detail proxy N = 3 ordered the held-out steps about as well and sampled the same; the planner's age
weighting already covers older caches).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..families import binding_for
from ..ideas.drop.router_file import RouterSpec, new_router, save_router
from ..ideas.drop.router_net import FEATURES, router_features, token_grid
from ..kernels import token_scores as ks

LOSSES = ("rank", "ratio")
SEED_OFFSET = 100_000   # rollout seeds 100000.. : never the benchmarks' seeds 0..2n-1
EVAL_BUDGETS = (0.3, 0.5)


@dataclass
class RouterTrainConfig:
    steps: int = 1000
    minutes: float | None = None
    batch: int = 16               # (sample, step) records per optimiser step
    lr: float = 3e-3
    pool: int = 64                # rolled-out seeds (a quarter held out for the measure)
    gen_batch: int = 16
    width: int = 16
    loss: str = "rank"
    budgets: tuple[float, float] = (0.2, 0.8)
    start_percent: float = 0.2    # steps before this sampling percent are never routed: not trained on
    holdout: float = 0.25
    lags: int = 1                 # target: mean skip error of a cached velocity 1..lags steps old
    seed: int = 0
    log_every: int = 50

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"router loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        lo, hi = (float(b) for b in self.budgets)
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"router budgets must be a range inside (0, 1), got {self.budgets}")
        self.budgets = (lo, hi)
        if self.pool < 2 or not 0.0 < self.holdout < 1.0:
            raise ValueError("router training needs --pool >= 2 and a held-out share in (0, 1)")
        if self.steps < 1 or self.batch < 1 or self.width < 4 or self.width % 4:
            raise ValueError("router training needs --steps >= 1, --batch >= 1 and a width that is a multiple of 4")
        if self.lags < 1:
            raise ValueError(f"lags must be >= 1, got {self.lags}")
        if not 0.0 <= self.start_percent < 1.0:
            raise ValueError(f"start_percent must be in [0, 1), got {self.start_percent}")


# ----------------------------------------------------------------------------- records

@torch.no_grad()
def rollout_records(provider, model_patcher, binding, seeds: list[int], gen_batch: int, start_sigma: float,
                    log=print, lags: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
    """Sample ``seeds`` densely; return per (sample, routable step): features ``(R, N, F)`` (fp16),
    skip errors ``(R, N)`` (fp32), the sample index ``(R,)``, and the token grid."""
    import comfy.sample

    p, tp = binding.native_patch, binding.temporal_patch
    feats, errs, owner, grid = [], [], [], None
    for start in range(0, len(seeds), gen_batch):
        batch = seeds[start:start + gen_batch]
        states: dict[int, tuple] = {}

        def callback(step, x0, x, total):
            states[step] = (x.detach().float().cpu(), x0.detach().float().cpu())
        positive, negative = provider.conditioning(batch)
        empty = comfy.sample.fix_empty_latent_channels(model_patcher, provider.empty_latent(len(batch)))
        noise = torch.cat([comfy.sample.prepare_noise(empty[:1], s) for s in batch])
        sigmas = _sigmas(provider, model_patcher)
        comfy.sample.sample(model_patcher, noise, provider.steps, provider.cfg, provider.sampler,
                            provider.scheduler, positive, negative, empty, seed=batch[0], callback=callback,
                            disable_pbar=True)
        vel = {}
        for i, (x, x0) in states.items():
            s = float(sigmas[i])
            vel[i] = (x - x0) / max(s, 1e-6)
        for i in sorted(states):
            if i < 1 or i - 1 not in states or float(sigmas[i]) > start_sigma:
                continue
            x_prev, x_cur = states[i - 1][0], states[i][0]
            f = router_features(x_prev, x_cur, float(sigmas[i - 1]), float(sigmas[i]), p, tp)
            # the cached velocity is 1..lags steps old (a dense refresh every lags + 1 steps)
            back = [k for k in range(1, lags + 1) if i - k in vel]
            e = sum(ks.token_values((vel[i] - vel[i - k]).square(), p, tp).sum(dim=-1) for k in back) / len(back)
            feats.append(f.half())
            errs.append(e.float())
            owner.append(torch.arange(start, start + len(batch)))
            grid = token_grid(x_cur.shape, p, tp)
        log(f"rolled out {min(start + gen_batch, len(seeds))}/{len(seeds)} seeds "
            f"({len(feats)} step batches recorded)")
    if not feats:
        raise ValueError("no sampling step falls in the routing window: lower --router-start or raise the steps")
    return torch.cat(feats), torch.cat(errs), torch.cat(owner), grid


def _sigmas(provider, model_patcher) -> torch.Tensor:
    import comfy.samplers

    sampling = model_patcher.get_model_object("model_sampling")
    return comfy.samplers.calculate_sigmas(sampling, provider.scheduler, provider.steps).float().cpu()


# ----------------------------------------------------------------------------- losses and the measure

def rank_loss(logits: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
    """ListNet: cross-entropy of softmax(logits) against the step's error distribution."""
    q = err / err.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return -(q * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def ratio_loss(logits: torch.Tensor, err: torch.Tensor, budget: float) -> torch.Tensor:
    """Expected skipped error of a soft top-``budget`` + DC-DiT's ratio loss towards ``budget``."""
    q = torch.quantile(logits.detach(), 1.0 - budget, dim=-1, keepdim=True)
    p = torch.sigmoid(logits - q)
    skipped = ((1.0 - p) * err).sum(dim=-1) / err.sum(dim=-1).clamp_min(1e-20)
    n = 1.0 / budget
    f_hard = (p > 0.5).float().mean(dim=-1)
    g_soft = p.mean(dim=-1)
    ratio = ((1 - f_hard) * (1 - g_soft) + f_hard * g_soft * (n - 1)) * n / (n - 1)
    return (skipped + ratio).mean()


def captured(scores: torch.Tensor, err: torch.Tensor, budget: float) -> float:
    """Mean share of each row's error that the top-``budget`` tokens by ``scores`` cover."""
    k = ks.budget_tokens(budget, scores.shape[-1])
    top = torch.topk(scores.float(), k, dim=-1).indices
    return float((err.gather(-1, top).sum(-1) / err.sum(-1).clamp_min(1e-20)).mean())


def measure(net, feats, errs, grid, chunk: int = 64) -> dict:
    """``captured`` at EVAL_BUDGETS for the router and, on the same steps, ras, context, oracle."""
    with torch.no_grad():
        logits = torch.cat([net(feats[i:i + chunk].float(), grid) for i in range(0, len(feats), chunk)])
    ras = feats[..., FEATURES_AT["log_update"]].float()
    context = feats[..., FEATURES_AT["log_context"]].float()
    out = {}
    for b in EVAL_BUDGETS:
        out[f"{b:g}"] = {"learned": captured(logits, errs, b), "ras": captured(ras, errs, b),
                         "context": captured(context, errs, b), "oracle": captured(errs, errs, b), "random": b}
    return out


FEATURES_AT = {"log_update": -3, "log_context": -2, "log_sigma": -1}
assert FEATURES[-3:] == ("log_update", "log_context", "log_sigma")


# ----------------------------------------------------------------------------- training

def train_router(provider, cfg: RouterTrainConfig, out_path: str | Path, *, device: str | None = None,
                 log=print) -> dict:
    t0 = time.time()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_patcher = provider.load()
    binding = binding_for(model_patcher)
    sampling = model_patcher.get_model_object("model_sampling")
    start_sigma = float(sampling.percent_to_sigma(cfg.start_percent)) if hasattr(sampling, "percent_to_sigma") else math.inf
    seeds = [SEED_OFFSET + cfg.seed * 10_000 + i for i in range(cfg.pool)]
    log(f"router training: rolling out {cfg.pool} seeds densely ({provider.steps} steps, cfg {provider.cfg}, "
        f"{provider.sampler}/{provider.scheduler}); window from {cfg.start_percent:g} (sigma <= {start_sigma:.4g})")
    feats, errs, owner, grid = rollout_records(provider, model_patcher, binding, seeds, cfg.gen_batch, start_sigma,
                                               log, cfg.lags)
    t_rollout = time.time() - t0
    held = owner >= int(round(cfg.pool * (1.0 - cfg.holdout)))
    train_f, train_e = feats[~held], errs[~held]
    val_f, val_e = feats[held], errs[held]
    if len(train_f) == 0 or len(val_f) == 0:
        raise ValueError("router training: --pool too small to hold seeds out (use at least 4)")

    spec_training = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    router = new_router(RouterSpec.for_model(model_patcher, binding, cfg.width, {}))
    net = router.net.requires_grad_(True).train()
    flat = train_f.float().reshape(-1, train_f.shape[-1])
    net.set_normalisation(flat.mean(0), flat.std(0))
    del flat
    net.to(device)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    lo, hi = cfg.budgets
    step, losses = 0, []
    t_train = time.time()
    while step < cfg.steps:
        if cfg.minutes is not None and time.time() - t0 > 60.0 * cfg.minutes:
            log(f"stopping at step {step}: --minutes {cfg.minutes:g} reached")
            break
        idx = torch.randint(len(train_f), (cfg.batch,), generator=gen)
        f = train_f[idx].float().to(device)
        e = train_e[idx].to(device)
        logits = net(f, grid)
        if cfg.loss == "rank":
            loss = rank_loss(logits, e)
        else:
            b = lo + (hi - lo) * float(torch.rand((), generator=gen))
            loss = ratio_loss(logits, e, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(float(loss.detach()))
        if step % cfg.log_every == 0 or step == cfg.steps:
            log(f"step {step}/{cfg.steps}  loss {sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:]):.4f}")
    net.eval().requires_grad_(False).cpu()
    result = measure(net, val_f, val_e, grid)
    for b, row in result.items():
        log(f"held-out captured skip error at budget {b}: learned {row['learned']:.3f}, ras {row['ras']:.3f}, "
            f"context {row['context']:.3f}, oracle {row['oracle']:.3f}, random {row['random']:.3f}")
    describe = getattr(provider, "describe", None)
    spec_training.update({
        "steps_done": step, "records": int(len(train_f)), "held_out_records": int(len(val_f)),
        "grid": list(grid), "provider": describe() if callable(describe) else type(provider).__name__,
        "sample_steps": provider.steps, "cfg": provider.cfg, "sampler": provider.sampler,
        "scheduler": provider.scheduler, "held_out_captured": result,
        "target": "||v_t - v_(t-1)||^2 per token (guided velocity; RAS cache fill)"})
    spec_training = json.loads(json.dumps(spec_training, default=str))  # metadata is JSON
    spec = RouterSpec.for_model(model_patcher, binding, cfg.width, spec_training)
    path = save_router(net, spec, out_path)
    summary = {"mode": "router", "out": str(path), "parameters": net.parameter_count(),
               "file_bytes": path.stat().st_size, "steps": step, "loss_last": losses[-1] if losses else None,
               "rollout_s": round(t_rollout, 1), "train_s": round(time.time() - t_train, 1),
               "records": int(len(train_f)), "held_out_records": int(len(val_f)), "grid": list(grid),
               "held_out_captured": result, "config": spec_training}
    log(f"wrote {path} ({net.parameter_count()} parameters, {path.stat().st_size / 1024:.1f} KiB)")
    return summary
