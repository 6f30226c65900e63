"""Learn a merge pattern (LGM) for a frozen model: ``--mode pattern`` of the training command.

No backpropagation through the transformer: the frozen model is sampled densely (ComfyUI's own
sampler, the provider's prompts, steps and CFG) and a DIFFUSION_MODEL wrapper reads every call's
output. Per call and token it forms a feature (the clean estimate ``x - sigma * v`` by default, or
the velocity ``v``), scaled so each call counts alike, and adds up, for every pair of tokens of a
local block (kernels/merge_cluster.py: the blocks the pattern is clustered in), the squared feature
distance. Those block pair sums are all training and validation need:

* merging a group costs its members' deviation from the group mean; with the default ``velocity``
  unmerge each member keeps its own noise and gets the group's clean estimate, so the cost is the
  within-group variance of the clean estimate, ``sum_{i,j in S} ||f_i - f_j||^2 / 2|S|``;
* the embedding ``E`` (``--pattern-dim`` numbers per position) is trained so that ``cos(E_i, E_j)``
  ranks the pairs of a block as the data does: a hinge on triplets, ``relu(margin - (cos_ij -
  cos_ik))`` for ``d_ij < d_ik``, weighted by the gap (LGM's margin 0.25); and (``--pattern-proto``)
  LGM's straight-through softmax to prototypes (temperature 0.1): ``E`` is clustered at a ratio
  drawn from [0.25, 0.75], each group's mean direction is a prototype, tokens are assigned to
  their block's prototypes by a hard assignment whose gradient is the softmax's, and the loss is the
  merge cost of that assignment;
* validation: on rollouts of held-out seeds, the merge cost (mean per token and call) of the
  learned pattern against the training-free ``spread`` and ``border_first`` at equal ratios, for
  the velocity and for the clean estimate; printed and stored in the file's metadata.

The pattern is written as ideas/merge/learned_pattern.py's safetensors file, with the base-model
fingerprint; it holds one token grid (the provider's latent size).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ..families import binding_for
from ..families.call_args import bind_call
from ..ideas.merge.learned_pattern import LearnedPattern, PatternSpec, save_pattern
from ..kernels.merge_cluster import LINKAGES, Dendrograms, block_cells, block_shape, within_group_sum
from ..kernels.merge_pattern import ORDERS, VIDEO_MODES, merge_pattern
from ..kernels.patchify import patchify

FEATURES = ("denoised", "velocity")
VAL_RATIOS = (0.25, 0.5, 0.75)
TRAIN_SEEDS = 500_000_000  # rollouts of seeds TRAIN_SEEDS + 10^7 * seed + i (never the benchmarks' 0..n-1)
VAL_SEEDS = 1_000_000_000  # held-out rollouts


@dataclass
class PatternConfig:
    dim: int = 16                     # embedding numbers per position
    block: int = 4                    # spatial block side (tokens)
    video_mode: str = "within_frames"
    feature: str = "denoised"         # what merged tokens should agree on (training target)
    max_group: int = 0                # largest group at sampling (0 = a whole block)
    linkage: str = "average"          # agglomerative linkage at sampling (kernels/merge_cluster.py)
    shrink: float | None = None       # weight of the block-average distances (None: chosen by split halves)
    samples: int = 32                 # training rollouts
    val_samples: int = 8              # held-out rollouts (validation)
    gen_batch: int = 8
    steps: int = 400                  # optimisation steps of E (cheap: no model calls)
    lr: float = 0.05
    margin: float = 0.25              # LGM's hinge margin
    proto: float = 1.0                # weight of the straight-through prototype loss (0 = hinge only)
    temperature: float = 0.1          # LGM's softmax temperature
    seed: int = 0
    log_every: int = 100

    def __post_init__(self):
        if self.video_mode not in VIDEO_MODES:
            raise ValueError(f"video mode must be one of {VIDEO_MODES}, got {self.video_mode!r}")
        if self.feature not in FEATURES:
            raise ValueError(f"--pattern-feature must be one of {FEATURES}, got {self.feature!r}")
        if self.dim < 2 or self.block < 2 or self.samples < 1 or self.val_samples < 1 or self.steps < 0:
            raise ValueError("pattern training: dim >= 2, block >= 2, samples >= 1, val samples >= 1, steps >= 0")
        if self.linkage not in LINKAGES:
            raise ValueError(f"linkage must be one of {LINKAGES}, got {self.linkage!r}")
        if self.shrink is not None and not 0.0 <= self.shrink <= 1.0:
            raise ValueError(f"shrink must be in [0, 1] (or None: chosen from the rollouts), got {self.shrink}")
        if self.max_group < 0:
            raise ValueError(f"max group must be >= 0 (0 = a whole block), got {self.max_group}")


# ----------------------------------------------------------------------------- rollouts

class PairStats:
    """Block pair sums of squared feature distances, for the clean estimate and the velocity."""

    def __init__(self, cells: torch.Tensor):
        self.cells = cells
        c = cells.shape[1]
        self.sums = {f: torch.zeros(cells.shape[0], c, c, dtype=torch.float64) for f in FEATURES}
        self.calls = 0        # feature rows added (sample x call)
        self._cells_on: dict = {}

    def add(self, feature: str, f: torch.Tensor) -> None:
        """``f``: (rows, N, F) features of one call; each row scaled to a mean square of 1 per token.
        Computed where ``f`` is (the sampling device), summed on the CPU."""
        f = f.double()
        f = f / f.pow(2).sum(-1).mean(1, keepdim=True).clamp_min(1e-24).sqrt().unsqueeze(-1)
        key = str(f.device)
        if key not in self._cells_on:
            self._cells_on[key] = self.cells.to(f.device)
        cells = self._cells_on[key]
        ok = (cells >= 0).double()
        g = f[:, cells.clamp_min(0)] * ok.unsqueeze(-1)               # (rows, B, C, F)
        sq = g.pow(2).sum(-1)
        gram = g @ g.transpose(-1, -2)
        d = (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * gram).clamp_min(0)
        d = d * ok.unsqueeze(-1) * ok.unsqueeze(-2)
        self.sums[feature] += d.sum(0).cpu()

    def mean(self, feature: str) -> torch.Tensor:
        return self.sums[feature] / max(self.calls, 1)


class FeatureRecorder:
    """DIFFUSION_MODEL wrapper: every call's per-token clean estimate and velocity into PairStats."""

    def __init__(self, binding, stats: PairStats):
        self.binding = binding
        self.stats = stats

    def __call__(self, executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        bound = bind_call(executor, args, kwargs)
        x = bound.arguments["x"]
        opts = bound.arguments.get("transformer_options") or {}
        sigma = opts.get("sigmas")
        if not isinstance(sigma, torch.Tensor):
            raise RuntimeError("pattern training: the sampler passed no sigmas in transformer_options")
        b = self.binding
        c = b.latent_channels
        x = x[:, :c].detach().float()
        v = out[:, :c].detach().float()
        s = sigma.detach().float().to(x.device).reshape(-1)
        s = (s if s.numel() == x.shape[0] else s[:1].expand(x.shape[0])).view(-1, *([1] * (x.ndim - 1)))
        patch = b.native_patch if x.ndim == 4 else (b.temporal_patch, b.native_patch, b.native_patch)
        for name, f in (("denoised", x - s * v), ("velocity", v)):
            self.stats.add(name, patchify(_pad(f, patch), patch)[0])
        self.stats.calls += x.shape[0]
        return out


def _pad(x: torch.Tensor, patch) -> torch.Tensor:
    """Zero-pad the latent up to the patch, as the models pad."""
    ps = (patch,) * 2 if isinstance(patch, int) else patch
    dims = x.shape[-len(ps):]
    pads = []
    for size, p in zip(reversed(dims), reversed(ps)):
        pads += [0, (-size) % p]
    return torch.nn.functional.pad(x, pads) if any(pads) else x


def roll_out(provider, model, binding, seeds: list[int], stats, gen_batch: int, log) -> None:
    """Sample ``seeds`` with the frozen model (the provider's settings), recording pair sums into
    ``stats`` (a PairStats, or a list: batch ``i`` goes to ``stats[i % len(stats)]``)."""
    import comfy.patcher_extension as pe
    import comfy.sample

    targets = stats if isinstance(stats, (list, tuple)) else [stats]
    recorder = FeatureRecorder(binding, targets[0])
    mp = model.clone()
    mp.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "elastic_tokens.pattern_recorder", recorder)
    for i, start in enumerate(range(0, len(seeds), gen_batch)):
        recorder.stats = targets[i % len(targets)]
        batch = seeds[start:start + gen_batch]
        positive, negative = provider.conditioning(batch)
        empty = provider.empty_latent(len(batch))
        noise = torch.cat([comfy.sample.prepare_noise(empty[:1], s) for s in batch])
        with torch.inference_mode():
            comfy.sample.sample(mp, noise, provider.steps, provider.cfg, provider.sampler, provider.scheduler,
                                positive, negative, empty, seed=batch[0], disable_pbar=True)
        log(f"rolled out {min(start + gen_batch, len(seeds))}/{len(seeds)} samples")


# ----------------------------------------------------------------------------- the embedding

def _normalised(d: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Pair distances in units of each block's mean distance between distinct present cells."""
    pair = ok.unsqueeze(2) & ok.unsqueeze(1) & ~torch.eye(ok.shape[1], dtype=torch.bool, device=ok.device)
    mean = (d * pair).sum((1, 2)) / pair.sum((1, 2)).clamp_min(1)
    return torch.where(pair, d / mean.clamp_min(1e-12).view(-1, 1, 1), torch.zeros_like(d))


def triplet_weights(dn: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``w[b, i, j, k] = clamp(d_ik - d_ij, 0, 1)`` over distinct present cells (``dn``: distances
    per block mean, :func:`_normalised`): how much closer ``j`` is to ``i`` than ``k`` is."""
    c = ok.shape[1]
    distinct = ~torch.eye(c, dtype=torch.bool, device=ok.device)
    valid = (ok.view(-1, c, 1, 1) & ok.view(-1, 1, c, 1) & ok.view(-1, 1, 1, c)
             & distinct.view(1, c, c, 1) & distinct.view(1, c, 1, c) & distinct.view(1, 1, c, c))
    w = (dn.unsqueeze(2) - dn.unsqueeze(3)).clamp(0, 1)        # [b, i, j, k] = d_ik - d_ij
    return (w * valid).float()


def hinge_chunks(cells: torch.Tensor, d: torch.Tensor, budget: int = 1 << 22):
    """Blocks in chunks of at most ``budget`` triplets, with each chunk's normalised distances, and
    the total triplet weight (the hinge's normaliser): the ``(B, C, C, C)`` weights of a large
    video grid are never held at once."""
    ok = cells >= 0
    dn = _normalised(d.double(), ok).float()
    c = cells.shape[1]
    step = max(1, budget // (c ** 3))
    chunks = [(slice(i, i + step)) for i in range(0, cells.shape[0], step)]
    total = sum(float(triplet_weights(dn[sl], ok[sl]).sum()) for sl in chunks)
    return [(cells[sl], dn[sl], ok[sl]) for sl in chunks], total


def hinge_loss(e: torch.Tensor, cells: torch.Tensor, dn: torch.Tensor, ok: torch.Tensor, margin: float,
               total: float) -> torch.Tensor:
    """LGM's hinge on the triplets of some blocks, divided by the total weight of all blocks'."""
    g = torch.nn.functional.normalize(e, dim=-1)[cells.clamp_min(0)]
    cos = g @ g.transpose(1, 2)                                 # (B, C, C)
    diff = cos.unsqueeze(3) - cos.unsqueeze(2)                  # [b, i, j, k] = cos_ij - cos_ik
    return (triplet_weights(dn, ok) * torch.relu(margin - diff)).sum() / max(total, 1e-12)


def prototype_loss(e: torch.Tensor, grid, cells: torch.Tensor, d: torch.Tensor, ratio: float, cfg: PatternConfig,
                   total: float) -> torch.Tensor:
    """LGM's straight-through assignment to prototypes: the merge cost (pair sums ``d``) of ``E``'s
    clustering at ``ratio``, whose gradient flows through a softmax over the block's prototypes."""
    groups, _ = Dendrograms.from_embedding(e.detach().cpu(), grid, cfg.video_mode, cfg.block,
                                           cfg.max_group or None, cfg.linkage).pattern(ratio)
    groups = groups.to(e.device)
    ok = cells >= 0
    en = torch.nn.functional.normalize(e, dim=-1)
    count = int(groups.max()) + 1
    proto = torch.nn.functional.normalize(e.new_zeros(count, e.shape[1]).index_add(0, groups, en), dim=-1)
    g = torch.where(ok, groups[cells.clamp_min(0)], torch.full_like(cells, -1))   # (B, C)
    c = cells.shape[1]
    # slot j of a block holds the prototype of the group whose first cell in the block is j
    same = (g.unsqueeze(2) == g.unsqueeze(1)) & ok.unsqueeze(2) & ok.unsqueeze(1)   # [b, i, j]
    first = torch.argmax(same.int(), dim=2)                                           # first cell of i's group
    rep = (first == torch.arange(c, device=e.device).view(1, -1)) & ok     # slot j is a representative
    slots = proto[g.clamp_min(0)]                                                     # (B, C, dim)
    logits = (en[cells.clamp_min(0)] @ slots.transpose(1, 2)) / cfg.temperature      # [b, i, slot]
    logits = logits.masked_fill(~rep.unsqueeze(1), float("-inf"))
    soft = torch.softmax(logits, -1)
    hard = torch.nn.functional.one_hot(first, c).float() * ok.unsqueeze(2)
    a = hard + soft - soft.detach()
    a = a * ok.unsqueeze(2)
    size = a.sum(1)                                                                   # (B, slots)
    cost = torch.einsum("bis,bjs,bij->bs", a, a, d.float()) / (2 * size.detach().clamp_min(1.0))
    return cost.sum() / total


def train_embedding(grid, cells, d: torch.Tensor, cfg: PatternConfig, log, device="cpu") -> torch.Tensor:
    """The embedding ``(N, dim)`` whose cosine ranks each block's pairs as ``d`` does (fitted on
    ``device``; returned on the CPU)."""
    n = grid[0] * grid[1] * grid[2]
    gen = torch.Generator().manual_seed(cfg.seed)
    e = torch.nn.Parameter(torch.randn(n, cfg.dim, generator=gen).to(device))
    cells, d = cells.to(device), d.to(device)
    chunks, wsum = hinge_chunks(cells, d)
    total = float(d.sum()) / max(n, 1)  # scale of the merge cost (mean pair sum per token)
    optim = torch.optim.Adam([e], lr=cfg.lr)
    rng = torch.Generator().manual_seed(cfg.seed + 1)
    for step in range(cfg.steps):
        optim.zero_grad(set_to_none=True)
        loss = 0.0
        for part in chunks:  # backward per chunk: one chunk's triplets in memory at a time
            hinge = hinge_loss(e, *part, cfg.margin, wsum)
            hinge.backward()
            loss += float(hinge.detach())
        proto = None
        if cfg.proto > 0:
            ratio = 0.25 + 0.5 * float(torch.rand((), generator=rng))
            proto = prototype_loss(e, grid, cells, d, round(ratio, 2), cfg, total)
            (cfg.proto * proto).backward()
            loss += cfg.proto * float(proto.detach())
        optim.step()
        if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            log(f"step {step}: loss {loss:.4f}" + ("" if proto is None else f" (prototypes {float(proto.detach()):.4f})"))
    return e.detach().cpu()


# ----------------------------------------------------------------------------- validation

def merge_costs(stats: PairStats, grid, learned: LearnedPattern, cfg: PatternConfig, ratios=VAL_RATIOS) -> dict:
    """Mean within-group squared deviation per token and call, per feature, ratio and pattern."""
    n = grid[0] * grid[1] * grid[2]
    out: dict = {}
    for feature in FEATURES:
        d = stats.mean(feature)
        rows = {}
        for ratio in ratios:
            row = {}
            for order in ORDERS:
                groups, _ = merge_pattern(grid, ratio, order, cfg.video_mode)
                row[order] = within_group_sum(d, stats.cells, groups) / n
            groups, _ = learned.pattern(grid, ratio, cfg.video_mode)
            row["learned"] = within_group_sum(d, stats.cells, groups) / n
            rows[f"{ratio:g}"] = row
        out[feature] = rows
    return out


def oracle_costs(train: PairStats, val: PairStats, grid, cfg: PatternConfig, alpha: float = 0.0,
                 ratios=VAL_RATIOS) -> dict:
    """The merge cost on held-out rollouts of clustering the training pair distances themselves
    (no embedding): how much the embedding's low rank leaves on the table."""
    n = grid[0] * grid[1] * grid[2]
    ok = train.cells >= 0
    dist = shrunk(train.mean(cfg.feature), train.cells, alpha).masked_fill(~(ok.unsqueeze(2) & ok.unsqueeze(1)),
                                                                       float("inf"))
    den = Dendrograms(grid, dist, train.cells, cfg.max_group or None, cfg.linkage)
    return {f"{r:g}": within_group_sum(val.mean(cfg.feature), val.cells, den.pattern(r)[0]) / n for r in ratios}


def format_costs(costs: dict, oracle: dict | None = None) -> str:
    lines = []
    for feature, rows in costs.items():
        lines.append(f"held-out merge cost ({feature}; within-group variance per token, lower is better):")
        lines.append("  ratio  " + "  ".join(f"{k:>12}" for k in next(iter(rows.values()))) + "  learned/best")
        for ratio, row in rows.items():
            best = min(v for k, v in row.items() if k != "learned")
            extra = f"   (direct clustering {oracle[ratio]:.4f})" if oracle and feature in ("denoised",) and ratio in oracle else ""
            lines.append(f"  {ratio:>5}  " + "  ".join(f"{v:12.4f}" for v in row.values())
                         + f"  {row['learned'] / best if best > 0 else float('nan'):12.3f}" + extra)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command

def _stats_file(ckpt, cfg: PatternConfig, grid):
    from pathlib import Path

    name = f"pattern_stats_{'x'.join(map(str, grid))}_{cfg.video_mode}_b{cfg.block}_n{cfg.samples}_v{cfg.val_samples}_s{cfg.seed}.safetensors"
    return Path(ckpt) / name


STATS_PARTS = ("train_a", "train_b", "val")


def save_stats(path, parts) -> None:
    """The pair sums of ``parts`` (training halves A and B, validation) in one safetensors file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{which}.{f}": st.sums[f].contiguous() for which, st in zip(STATS_PARTS, parts) for f in FEATURES}
    tensors["cells"] = parts[0].cells.contiguous()
    save_file(tensors, str(path), metadata={f"{which}_calls": str(st.calls) for which, st in zip(STATS_PARTS, parts)})


def load_stats(path, cells: torch.Tensor):
    """``(train A, train B, val)`` from :func:`save_stats`'s file, or None if it is for other blocks."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if not torch.equal(f.get_tensor("cells"), cells) or any(f"{w}_calls" not in meta for w in STATS_PARTS):
            return None
        out = []
        for which in STATS_PARTS:
            st = PairStats(cells)
            st.sums = {feat: f.get_tensor(f"{which}.{feat}") for feat in FEATURES}
            st.calls = int(meta[f"{which}_calls"])
            out.append(st)
    return out


def combined(parts) -> PairStats:
    out = PairStats(parts[0].cells)
    for st in parts:
        for f in FEATURES:
            out.sums[f] = out.sums[f] + st.sums[f]
        out.calls += st.calls
    return out


# ----------------------------------------------------------------------------- shrinkage

SHRINKS = (0.0, 0.25, 0.5, 0.75, 1.0)


def block_average(d: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Each cell pair's distance averaged over all blocks where both cells exist, for every block:
    what the rollouts say about a block's layout, not about its place in the image."""
    ok = cells >= 0
    pair = (ok.unsqueeze(2) & ok.unsqueeze(1)).to(d.dtype)
    mean = (d * pair).sum(0) / pair.sum(0).clamp_min(1)
    return mean.unsqueeze(0).expand_as(d) * pair


def shrunk(d: torch.Tensor, cells: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha)`` the blocks' own distances plus ``alpha`` their average over blocks: a
    pattern fitted to few rollouts otherwise follows their noise."""
    return d if alpha == 0 else (1 - alpha) * d + alpha * block_average(d, cells)


def choose_shrink(a: PairStats, b: PairStats, grid, cfg: PatternConfig, ratios=VAL_RATIOS):
    """The shrinkage whose direct clustering of one training half merges the other half cheapest
    (both ways, mean over ``ratios`` of the cost relative to ``spread``'s); ``(alpha, table)``."""
    cells = a.cells
    ok = cells >= 0
    pair = ok.unsqueeze(2) & ok.unsqueeze(1)
    table = {}
    for alpha in SHRINKS:
        score = 0.0
        for fit, test in ((a, b), (b, a)):
            d = shrunk(fit.mean(cfg.feature), cells, alpha).masked_fill(~pair, float("inf"))
            den = Dendrograms(grid, d, cells, cfg.max_group or None, cfg.linkage)
            for r in ratios:
                ref = within_group_sum(test.mean(cfg.feature), cells, merge_pattern(grid, r, "spread", cfg.video_mode)[0])
                cost = within_group_sum(test.mean(cfg.feature), cells, den.pattern(r)[0])
                score += cost / max(ref, 1e-30)
        table[f"{alpha:g}"] = score / (2 * len(ratios))
    best = min(SHRINKS, key=lambda x: (table[f"{x:g}"], x))
    return best, table


def train_pattern(provider, cfg: PatternConfig, out: str, device: str = "cpu", log=print, ckpt: str | None = None,
                  resume: bool = False) -> dict:
    """Roll the model out, learn the embedding, validate, write the pattern file; returns a summary.
    With ``ckpt`` the rollouts' pair sums are kept there; ``resume`` reuses them (same grid, blocks,
    sample counts and seed) instead of sampling again."""
    t0 = time.time()
    model = provider.load()
    binding = binding_for(model)
    latent = provider.empty_latent(1)
    grid = binding.grid(tuple(latent.shape))
    cells = block_cells(grid, block_shape(grid[0], cfg.video_mode, cfg.block))
    log(f"pattern for a {binding.family} model, token grid {grid}, blocks {block_shape(grid[0], cfg.video_mode, cfg.block)} "
        f"({cells.shape[0]} blocks), feature {cfg.feature}")
    stats_path = _stats_file(ckpt, cfg, grid) if ckpt else None
    loaded = load_stats(stats_path, cells) if resume and stats_path is not None and stats_path.is_file() else None
    if loaded is not None:
        half_a, half_b, val = loaded
        log(f"rollout statistics from {stats_path}")
    else:
        half_a, half_b, val = PairStats(cells), PairStats(cells), PairStats(cells)
        # seeds far from 0.. (the benchmarks' seeds) and from each other
        seeds = [TRAIN_SEEDS + cfg.seed * 10_000_000 + i for i in range(cfg.samples)]
        val_seeds = [VAL_SEEDS + i for i in range(cfg.val_samples)]
        roll_out(provider, model, binding, seeds, [half_a, half_b], cfg.gen_batch, log)  # batches alternate
        roll_out(provider, model, binding, val_seeds, val, cfg.gen_batch, log)
        if stats_path is not None:
            save_stats(stats_path, (half_a, half_b, val))
    train = combined((half_a, half_b))
    t_roll = time.time() - t0
    shrink_table = None
    alpha = cfg.shrink
    if alpha is None:
        if half_b.calls and half_a.calls:
            alpha, shrink_table = choose_shrink(half_a, half_b, grid, cfg)
            log("shrinkage toward the block average (split-half cost relative to spread): "
                + ", ".join(f"{k}: {v:.3f}" for k, v in shrink_table.items()) + f"; using {alpha:g}")
        else:
            alpha = 0.0
            log("one rollout batch: no split halves to choose the shrinkage from; none used")
    d = shrunk(train.mean(cfg.feature), cells, alpha)
    d = (d / d[d > 0].mean().clamp_min(1e-12)).float()  # one scale for all blocks: blocks compare in the cut
    e = train_embedding(grid, cells, d, cfg, log, device)
    training = {"mode": "pattern", "samples": cfg.samples, "val_samples": cfg.val_samples,
                "sampling": {"steps": provider.steps, "cfg": provider.cfg, "sampler": provider.sampler,
                             "scheduler": provider.scheduler},
                "config": asdict(cfg), "provider": getattr(provider, "name", type(provider).__name__),
                "rollout_s": round(t_roll, 1), "shrink": alpha, "shrink_split_half": shrink_table}
    spec = PatternSpec.for_model(model, binding, grid, cfg.dim, cfg.block, cfg.video_mode, cfg.max_group, training,
                                 cfg.linkage)
    learned = LearnedPattern(spec, e.reshape(*grid, cfg.dim), "pattern")
    costs = merge_costs(val, grid, learned, cfg)
    oracle = oracle_costs(train, val, grid, cfg, alpha)
    log(format_costs(costs, oracle))
    worse = [r for r, row in costs[cfg.feature].items()
             if row["learned"] >= min(v for k, v in row.items() if k != "learned")]
    if worse:
        log(f"note: on held-out rollouts the learned pattern does not beat the best training-free one at ratio "
            f"{', '.join(worse)}: more rollouts (--pool; a pattern fitted to few samples follows their noise) "
            f"may help, else use a training-free order there")
    training["validation"] = {"costs": costs, "direct_clustering": oracle}
    training["seconds"] = round(time.time() - t0, 1)
    learned = LearnedPattern(PatternSpec(**{**asdict(spec), "grid": tuple(spec.grid), "training": training}),
                             learned.embedding, "pattern")
    path = save_pattern(learned, out)
    log(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB) in {training['seconds']:.0f} s")
    return {"out": str(path), "grid": list(grid), "family": binding.family, **training}
