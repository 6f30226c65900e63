"""Training-free global merge patterns: which image tokens become one token (their mean).

A pattern depends only on the token grid ``(frames, rows, cols)``, the ratio (share of the tokens
merged away) and the settings, never on the image being generated: every step and every sample of
a run merge alike (the LGM paper's point against data-dependent merging such as ToMe).

The grid is cut into blocks of four cells (a 2x2 square in a frame, the same position in four
consecutive frames) or, for ``both``, of eight (a 2x2 square in two consecutive frames). A block
is merged by *levels*: each level removes one more token by pairing (1x2 / 2x1 / two frames) and
then joining pairs, up to groups of 4 (a 2x2 square, 4 frames, or 2x1 space x 2 frames), so no
group holds more than 4 tokens and the ratio is at most 0.75. The ratio's removals are spread
over the blocks:

* ``spread``: level by level over all blocks, blocks in ordered-dither (Bayer) order, so a ratio
  between two levels merges a checkerboard-like spread of blocks one level more;
* ``border_first``: blocks nearest the border are merged fully first (the centre, where subjects
  usually are, last).

Pair orientations alternate over the blocks (1x2 in some, 2x1 in others, mixed at every scale of
the dither order) so no direction is favoured. Cells outside the grid (odd sizes) are left out of their block; time blocks
are anchored at the last frame, so a partial block is at the start (Wan's first latent frame, which
holds one video frame, is the one left over for 21 = 1 + 5x4 latent frames).

:func:`merge_pattern` returns a group index per token (groups numbered by their first token, so
singletons keep token order) and the group sizes; ratio 0 is the identity.
"""

from __future__ import annotations

from functools import lru_cache

import torch

ORDERS = ("spread", "border_first")
VIDEO_MODES = ("within_frames", "across_frames", "both")
MAX_RATIO = 0.75

# Ladders: per block kind and orientation variant, the group label of each cell at each level.
# 2x2 square, cells (dy, dx) = (0,0), (0,1), (1,0), (1,1); variant 0 pairs along rows (1x2), 1 along columns (2x1)
_SQUARE = (
    ((0, 1, 2, 3), (0, 0, 1, 2), (0, 0, 1, 1), (0, 0, 0, 0)),
    ((0, 1, 2, 3), (0, 1, 0, 2), (0, 1, 0, 1), (0, 0, 0, 0)),
)
# 4 consecutive frames at one position, cells dt = 0..3
_FRAMES = (((0, 1, 2, 3), (0, 0, 1, 2), (0, 0, 1, 1), (0, 0, 0, 0)),) * 2
# 2 frames x 2x2 square, cell = dt*4 + dy*2 + dx: first the temporal pairs (diagonal positions
# first), then pairs of temporal pairs along rows (variant 0) or columns (variant 1)
_BOTH = (
    ((0, 1, 2, 3, 4, 5, 6, 7), (0, 1, 2, 3, 0, 5, 6, 7), (0, 1, 2, 3, 0, 5, 6, 3), (0, 1, 2, 3, 0, 1, 6, 3),
     (0, 1, 2, 3, 0, 1, 2, 3), (0, 0, 2, 3, 0, 0, 2, 3), (0, 0, 2, 2, 0, 0, 2, 2)),
    ((0, 1, 2, 3, 4, 5, 6, 7), (0, 1, 2, 3, 0, 5, 6, 7), (0, 1, 2, 3, 0, 5, 6, 3), (0, 1, 2, 3, 0, 1, 6, 3),
     (0, 1, 2, 3, 0, 1, 2, 3), (0, 1, 0, 3, 0, 1, 0, 3), (0, 1, 0, 1, 0, 1, 0, 1)),
)
_PHI = 0.6180339887498949


def check_settings(ratio: float, order: str = "spread", mode: str = "within_frames") -> None:
    """Raise ValueError naming what is wrong with a pattern's settings."""
    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= MAX_RATIO:
        raise ValueError(f"merge ratio must be in [0, {MAX_RATIO}] (share of image tokens merged away; "
                         f"0.75 = every 2x2 square one token), got {ratio!r}")
    if order not in ORDERS:
        raise ValueError(f"merge order must be one of {ORDERS}, got {order!r}")
    if mode not in VIDEO_MODES:
        raise ValueError(f"video mode must be one of {VIDEO_MODES}, got {mode!r}")


def _bayer(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Ordered-dither rank in [0, 1) of cell (i, j): a low-discrepancy order over a grid whose
    first half is a checkerboard and first quarter every other row and column."""
    n = max(int(i.max()) if i.numel() else 0, int(j.max()) if j.numel() else 0, 1)
    bits = n.bit_length()
    digit = torch.tensor([[0, 2], [3, 1]], dtype=torch.long)
    v = torch.zeros_like(i)
    for b in range(bits):  # the lowest bits decide the most significant digit
        v = v * 4 + digit[(i >> b) & 1, (j >> b) & 1]
    return v.double() / float(4 ** bits)


def _blocks(frames: int, h: int, w: int, mode: str):
    """``(cells (B, C) token index or -1, ladder (2, L, C), variant (B,), spread key (B,),
    border distance (B,))`` for the block kind of ``mode``."""
    if mode == "within_frames" or frames == 1:
        bt, bh, bw = frames, -(-h // 2), -(-w // 2)
        ladder = _SQUARE
        offsets = [(0, dy, dx) for dy in (0, 1) for dx in (0, 1)]
        t0 = torch.arange(bt).view(-1, 1, 1)
    else:
        size = 4 if mode == "across_frames" else 2
        bt = -(-frames // size)
        lead = frames - bt * size  # <= 0: cells before frame 0 are missing (partial first block)
        t0 = (lead + size * torch.arange(bt)).view(-1, 1, 1)
        if mode == "across_frames":
            bh, bw, ladder = h, w, _FRAMES
            offsets = [(dt, 0, 0) for dt in range(4)]
        else:
            bh, bw, ladder = -(-h // 2), -(-w // 2), _BOTH
            offsets = [(dt, dy, dx) for dt in (0, 1) for dy in (0, 1) for dx in (0, 1)]
    sy = 1 if mode == "across_frames" and frames > 1 else 2
    by = torch.arange(bh).view(1, -1, 1)
    bx = torch.arange(bw).view(1, 1, -1)
    cells = []
    for dt, dy, dx in offsets:
        t = (t0 + dt).expand(bt, bh, bw)
        y = (by * sy + dy).expand(bt, bh, bw)
        x = (bx * sy + dx).expand(bt, bh, bw)
        ok = (t >= 0) & (t < frames) & (y < h) & (x < w)
        cells.append(torch.where(ok, (t * h + y) * w + x, torch.full_like(t, -1)).reshape(-1))
    cells = torch.stack(cells, 1)
    gy = by.expand(bt, bh, bw).reshape(-1)
    gx = bx.expand(bt, bh, bw).reshape(-1)
    gt = torch.arange(bt).view(-1, 1, 1).expand(bt, bh, bw).reshape(-1)
    variant = (gy + gx + gy // 2 + gx // 2) % 2  # alternates between neighbours and at every dither scale
    spread = (_bayer(gy, gx) + gt.double() * _PHI) % 1.0
    border = torch.minimum(torch.minimum(gy, gx), torch.minimum(bh - 1 - gy, bw - 1 - gx))
    return cells, torch.tensor(ladder, dtype=torch.long), variant, spread, border


def _removals(cells: torch.Tensor, ladder: torch.Tensor, variant: torch.Tensor) -> torch.Tensor:
    """(B, L): tokens a block removes at each level (present cells minus groups among them)."""
    labels = ladder[variant]                       # (B, L, C)
    present = (cells >= 0).unsqueeze(1)            # (B, 1, C)
    c = cells.shape[1]
    onehot = torch.nn.functional.one_hot(labels, c).bool() & present.unsqueeze(-1)
    groups = onehot.any(2).sum(-1)                 # (B, L)
    return present.sum(-1) - groups


def _levels(removal: torch.Tensor, order: torch.Tensor, target: int, border_first: bool) -> torch.Tensor:
    """Level per block so that the blocks remove ``target`` tokens (as close below as the ladders
    allow), in ``order``: level by level (spread) or each block fully (border first)."""
    n_blocks, n_levels = removal.shape
    level = torch.zeros(n_blocks, dtype=torch.long)
    left = target
    if border_first:
        full = removal[order, -1]
        cum = torch.cumsum(full, 0)
        take = cum <= left
        level[order[take]] = n_levels - 1
        left -= int(full[take].sum())
        rest = order[~take]
        for b in rest.tolist():  # at most a few blocks: each takes what it can
            if left <= 0:
                break
            fits = (removal[b] <= left).nonzero().flatten()
            best = int(fits[-1])
            level[b] = best
            left -= int(removal[b, best])
        return level
    for lv in range(1, n_levels):
        if left <= 0:
            break
        cand = order[(level[order] == lv - 1)]
        delta = removal[cand, lv] - removal[cand, lv - 1]
        cum = torch.cumsum(delta, 0)
        take = cum <= left
        level[cand[take]] = lv
        left -= int(delta[take].sum())
    return level


@lru_cache(maxsize=64)
def _pattern(frames: int, h: int, w: int, ratio: float, order: str, mode: str):
    n = frames * h * w
    target = min(int(round(ratio * n)), n - 1)
    if target <= 0:
        return torch.arange(n), torch.ones(n, dtype=torch.long)
    cells, ladder, variant, spread, border = _blocks(frames, h, w, mode)
    removal = _removals(cells, ladder, variant)
    if order == "border_first":
        key = torch.argsort(spread, stable=True)
        rank = torch.empty_like(key)
        rank[key] = torch.arange(key.numel())
        block_order = torch.argsort(border * key.numel() + rank, stable=True)
    else:
        block_order = torch.argsort(spread, stable=True)
    level = _levels(removal, block_order, target, order == "border_first")
    labels = ladder[variant, level]                # (B, C)
    return number_groups(cells, labels, n)


def number_groups(cells: torch.Tensor, labels: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups ``0..K-1`` from per-block cell labels (``cells``: the token of each cell of each
    block, -1 for none), numbered by their first token so singletons keep token order; and their
    sizes."""
    block = torch.arange(cells.shape[0]).view(-1, 1).expand_as(cells)
    ok = cells >= 0
    key = (block * cells.shape[1] + labels)[ok]
    token = cells[ok]
    _, inverse = torch.unique(key, return_inverse=True)
    count = int(inverse.max()) + 1
    first = torch.full((count,), n, dtype=torch.long).scatter_reduce(0, inverse, token, "amin")
    rank = torch.empty(count, dtype=torch.long)
    rank[torch.argsort(first)] = torch.arange(count)
    groups = torch.empty(n, dtype=torch.long)
    groups[token] = rank[inverse]
    return groups, torch.bincount(groups, minlength=count)


def merge_pattern(grid, ratio: float, order: str = "spread", mode: str = "within_frames"):
    """``(groups, sizes)`` for a token grid ``(rows, cols)`` or ``(frames, rows, cols)``.

    ``groups[i]`` (LongTensor, CPU) is token ``i``'s group, ``0..K-1`` numbered by first token;
    ``sizes[k]`` its member count (1, 2 or 4). ``K`` is ``round(N * (1 - ratio))`` where the grid
    allows (odd sizes and, across frames, a frame count not divisible by the block may leave a
    few tokens fewer merged). Ratio 0 is the identity. Returned tensors are shared (cached): do
    not modify them.
    """
    check_settings(ratio, order, mode)
    return _pattern(*token_grid(grid), float(ratio), order, mode)


def token_grid(grid) -> tuple[int, int, int]:
    """``(frames, rows, cols)`` of a grid given as ``(rows, cols)`` or ``(frames, rows, cols)``."""
    grid = tuple(int(v) for v in grid)
    if len(grid) == 2:
        grid = (1,) + grid
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"token grid must be (rows, cols) or (frames, rows, cols) of positive sizes, got {grid}")
    return grid
