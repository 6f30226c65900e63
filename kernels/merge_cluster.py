"""Learned merge patterns: agglomerative clustering of per-position embeddings within local blocks.

A learned pattern (LGM) starts from an embedding ``E`` of every token position of a grid (trained
on a model's own outputs, ideas/merge/learned_pattern.py). Tokens whose embeddings point the same
way (cosine) are merged first. As in LGM the clustering is agglomerative, **average linkage** on
the **cosine distance**, and it stays **within local blocks** (so a group never spans the image and
its merged position stays a local one; ``ward`` linkage is the option that joins what adds
the least within-group variance):

* within frames (and images): ``size x size`` squares of one frame;
* across frames: the same position in 4 consecutive frames;
* both: ``size x size`` squares in 2 consecutive frames.

Blocks are aligned like the training-free patterns (kernels/merge_pattern.py): squares at
multiples of ``size`` from the top-left, time blocks anchored at the last frame (the partial one
at the start), so every training-free group lies inside one block of the same video mode when
``size`` is even.

Each block's dendrogram is computed once (all blocks at once, Lance-Williams updates on a
``(blocks, cells, cells)`` distance tensor; no scipy). A ratio then takes the ``round(ratio * N)``
lowest merges over all blocks (heights made monotone per block, ties by merge step, then block),
so the token count matches the ratio exactly, like the training-free patterns, and homogeneous
blocks merge more than detailed ones. Deterministic (first index on ties, float64).

:func:`cluster_pattern` returns a group index per token (groups numbered by their first token, so
singletons keep token order) and the group sizes, as :func:`~.merge_pattern.merge_pattern` does.
"""

from __future__ import annotations

import torch

from .merge_pattern import MAX_RATIO, VIDEO_MODES, number_groups, token_grid

FRAMES_ACROSS = 4  # frames of an across-frames block (as the training-free ladder)
FRAMES_BOTH = 2    # frames of a "both" block


def block_shape(frames: int, mode: str, size: int) -> tuple[int, int, int]:
    """``(frames, rows, cols)`` of a block for ``mode`` (images and single frames: a square)."""
    if mode not in VIDEO_MODES:
        raise ValueError(f"video mode must be one of {VIDEO_MODES}, got {mode!r}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"block size must be a positive integer, got {size!r}")
    if frames == 1 or mode == "within_frames":
        return 1, size, size
    if mode == "across_frames":
        return FRAMES_ACROSS, 1, 1
    return FRAMES_BOTH, size, size


def block_cells(grid: tuple[int, int, int], shape: tuple[int, int, int]) -> torch.Tensor:
    """``(blocks, cells)`` token index of each block's cells (``-1`` outside the grid), blocks in
    (time, row, col) order, cells in (t, y, x) order. Time blocks end at the last frame."""
    frames, h, w = grid
    bt, bh, bw = shape
    nt, nh, nw = -(-frames // bt), -(-h // bh), -(-w // bw)
    lead = frames - nt * bt                                   # <= 0: the first block is partial
    t = (lead + bt * torch.arange(nt)).view(-1, 1, 1, 1, 1, 1) + torch.arange(bt).view(1, 1, 1, -1, 1, 1)
    y = (bh * torch.arange(nh)).view(1, -1, 1, 1, 1, 1) + torch.arange(bh).view(1, 1, 1, 1, -1, 1)
    x = (bw * torch.arange(nw)).view(1, 1, -1, 1, 1, 1) + torch.arange(bw).view(1, 1, 1, 1, 1, -1)
    t, y, x = torch.broadcast_tensors(t, y, x)
    ok = (t >= 0) & (t < frames) & (y < h) & (x < w)
    cells = torch.where(ok, (t * h + y) * w + x, torch.full_like(t, -1))
    return cells.reshape(nt * nh * nw, bt * bh * bw)


def cosine_distances(embedding: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """``(blocks, cells, cells)`` float64 cosine distance ``1 - cos`` between the embeddings
    ``(N, d)`` of each block's cells (``inf`` where a cell is missing)."""
    e = torch.nn.functional.normalize(embedding.detach().double(), dim=-1)
    g = e[cells.clamp_min(0)]
    d = (1.0 - g @ g.transpose(1, 2)).clamp_min(0.0)
    missing = cells < 0
    return d.masked_fill(missing.unsqueeze(1) | missing.unsqueeze(2), float("inf"))


LINKAGES = ("average", "ward")


def average_linkage(dist: torch.Tensor, max_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-linkage dendrograms of many small blocks at once (:func:`agglomerate`)."""
    return agglomerate(dist, "average", max_size)


def agglomerate(dist: torch.Tensor, linkage: str = "average",
                max_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Agglomerative dendrograms of many small blocks at once.

    ``dist``: ``(B, C, C)`` symmetric dissimilarities (``inf`` rows/columns: missing cells).
    Returns ``pairs (B, C-1, 2)`` (cluster ``b`` joins cluster ``a < b``, clusters named by their
    representative cell; ``-1`` where a block has no merge left) and ``heights (B, C-1)`` (float64,
    ``inf`` where no merge). Lance-Williams updates: with ``linkage="average"`` the joined
    cluster's distance to any other is the size-weighted mean of the two, so every entry stays the
    mean pairwise member distance; with ``"ward"``, ``dist`` is read as squared Euclidean distances
    (``1 - cos`` of unit vectors is half of one) and a join's height is twice the within-cluster sum
    of squares it adds, the quantity a merge loses. ``max_size``: clusters that would grow past it
    are never joined (their distance stays the true one for later joins). Deterministic (the first
    minimum in row-major order).
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    d = dist.detach().double().clone()
    n_blocks, c, _ = d.shape
    present = torch.isfinite(d).any(2) | torch.isfinite(d.diagonal(dim1=1, dim2=2))
    eye = torch.eye(c, dtype=torch.bool, device=d.device)
    d[:, eye] = float("inf")
    allow = torch.isfinite(d)
    if max_size is not None and max_size < 2:
        allow[:] = False
    size = present.double()
    pairs = torch.full((n_blocks, max(c - 1, 0), 2), -1, dtype=torch.long, device=d.device)
    heights = torch.full((n_blocks, max(c - 1, 0)), float("inf"), dtype=torch.float64, device=d.device)
    rows = torch.arange(n_blocks, device=d.device)
    for step in range(c - 1):
        h, idx = d.masked_fill(~allow, float("inf")).view(n_blocks, -1).min(1)   # first minimum: a < b
        ok = torch.isfinite(h)
        if not bool(ok.any()):
            break
        r = rows[ok]
        a, b = idx[ok] // c, idx[ok] % c
        heights[r, step] = h[ok]
        pairs[r, step, 0], pairs[r, step, 1] = a, b
        sa, sb = size[r, a].unsqueeze(1), size[r, b].unsqueeze(1)
        da, db = d[r, a], d[r, b]
        if linkage == "average":
            joined = (sa * da + sb * db) / (sa + sb)
            # inf stays inf (missing or gone clusters); 0 * inf cannot occur: both sizes are >= 1
        else:  # Lance-Williams for Ward
            sk = size[r]
            live = torch.isfinite(da) & torch.isfinite(db)
            num = (sa + sk) * da.masked_fill(~live, 0) + (sb + sk) * db.masked_fill(~live, 0) - sk * h[ok].unsqueeze(1)
            joined = torch.where(live, num / (sa + sb + sk), torch.full_like(da, float("inf")))
        d[r, a, :] = joined
        d[r, :, a] = joined
        d[r, a, a] = float("inf")
        d[r, b, :] = float("inf")
        d[r, :, b] = float("inf")
        size[r, a] += size[r, b]
        size[r, b] = 0.0
        joined_allow = (allow[r, a] | allow[r, b]) & torch.isfinite(joined)
        if max_size is not None:
            joined_allow &= (size[r, a].unsqueeze(1) + size[r]) <= max_size
        joined_allow[torch.arange(r.numel(), device=d.device), a] = False
        allow[r, a, :] = joined_allow
        allow[r, :, a] = joined_allow
        allow[r, b, :] = False
        allow[r, :, b] = False
    return pairs, heights


class Dendrograms:
    """The block dendrograms of one grid; :meth:`pattern` cuts them for any ratio (cached)."""

    def __init__(self, grid, dist: torch.Tensor, cells: torch.Tensor, max_size: int | None = None,
                 linkage: str = "average"):
        self.grid = tuple(int(v) for v in grid)
        self.tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.cells = cells
        self.pairs, heights = (t.cpu() for t in agglomerate(dist, linkage, max_size))  # cuts run on the CPU
        self.heights = torch.cummax(heights, 1).values if heights.numel() else heights  # monotone per block
        self.max_merges = int(torch.isfinite(self.heights).sum())
        self._cache: dict = {}

    @classmethod
    def from_embedding(cls, embedding: torch.Tensor, grid, mode: str = "within_frames", size: int = 4,
                       max_size: int | None = None, linkage: str = "average"):
        """Dendrograms of an embedding ``(frames, rows, cols, d)`` or ``(N, d)`` on ``grid`` (groups of
        at most ``max_size`` tokens; default: a whole block)."""
        grid = token_grid(grid)
        e = embedding.reshape(-1, embedding.shape[-1])
        if e.shape[0] != grid[0] * grid[1] * grid[2]:
            raise ValueError(f"embedding has {e.shape[0]} positions, grid {grid} has {grid[0] * grid[1] * grid[2]}")
        cells = block_cells(grid, block_shape(grid[0], mode, size))
        return cls(grid, cosine_distances(e, cells), cells, max_size, linkage)

    def merges_per_block(self, target: int) -> torch.Tensor:
        """How many of its merges each block makes so that all blocks make ``target``."""
        n_blocks, steps = self.heights.shape
        k = torch.zeros(n_blocks, dtype=torch.long)
        if target <= 0 or steps == 0:
            return k
        flat = self.heights.t().reshape(-1)           # step-major: ties go by step, then block
        order = torch.sort(flat, stable=True).indices[:target]
        block = order % n_blocks
        return torch.bincount(block, minlength=n_blocks)

    def pattern(self, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(groups, sizes)`` at ``ratio`` (share of tokens merged away, 0..0.75). Shared: do not modify."""
        ratio = float(ratio)
        if not 0.0 <= ratio <= MAX_RATIO:
            raise ValueError(f"merge ratio must be in [0, {MAX_RATIO}], got {ratio!r}")
        if ratio not in self._cache:
            n = self.tokens
            target = min(int(round(ratio * n)), n - 1, self.max_merges)
            self._cache[ratio] = self._cut(target)
        return self._cache[ratio]

    def _cut(self, target: int):
        n = self.tokens
        if target <= 0:
            return torch.arange(n), torch.ones(n, dtype=torch.long)
        k = self.merges_per_block(target)
        n_blocks, c = self.cells.shape
        labels = torch.arange(c).expand(n_blocks, c).clone()
        for step in range(int(k.max())):
            a, b = self.pairs[:, step, 0], self.pairs[:, step, 1]
            hit = (step < k).unsqueeze(1) & (labels == b.unsqueeze(1))
            labels = torch.where(hit, a.unsqueeze(1).expand_as(labels), labels)
        return number_groups(self.cells, labels, n)


def cluster_pattern(embedding: torch.Tensor, grid, ratio: float, mode: str = "within_frames",
                    size: int = 4, max_size: int | None = None, linkage: str = "average") -> tuple[torch.Tensor, torch.Tensor]:
    """``(groups, sizes)`` of the learned pattern of ``embedding`` on ``grid`` at ``ratio`` (one-off;
    hold a :class:`Dendrograms` to cut one grid at several ratios)."""
    return Dendrograms.from_embedding(embedding, grid, mode, size, max_size, linkage).pattern(ratio)


def within_group_sum(pair_sums: torch.Tensor, cells: torch.Tensor, groups: torch.Tensor) -> float:
    """Sum over groups of the squared deviations from the group mean, from block pair sums
    ``pair_sums[b, i, j] = sum ||f_i - f_j||^2`` (``(1 / 2|S|) sum_{i,j in S}``). Every group of
    ``groups`` must lie inside one block of ``cells`` (ValueError otherwise)."""
    ok = cells >= 0
    g = torch.where(ok, groups[cells.clamp_min(0)], torch.full_like(cells, -1))
    count = int(groups.max()) + 1
    block = torch.arange(cells.shape[0]).view(-1, 1).expand_as(cells)[ok]
    low = torch.full((count,), cells.shape[0], dtype=torch.long).scatter_reduce(0, g[ok], block, "amin")
    high = torch.full((count,), -1, dtype=torch.long).scatter_reduce(0, g[ok], block, "amax")
    if int(ok.sum()) != groups.numel() or not torch.equal(low, high):
        raise ValueError("a group spans tokens of several blocks (a pattern of another grid or block size?)")
    sizes = torch.bincount(groups, minlength=count).double()
    same = (g.unsqueeze(2) == g.unsqueeze(1)) & ok.unsqueeze(2) & ok.unsqueeze(1)
    weight = same.double() / (2.0 * sizes[g.clamp_min(0)]).unsqueeze(2)
    return float((pair_sums.double() * weight).sum())
