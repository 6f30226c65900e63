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


# -- the runtime and the node, through the real KSampler ------------------------------------------
import tiny_models  # noqa: E402
from node_runs import ksample, options_snapshot, token_merge  # noqa: E402


def report(model):
    from elastic_tokens import last_run_report

    return last_run_report(model)


class PatternPlanner:
    """A merge planner with a fixed pattern maker ``make(grid_tokens)`` (tests the executor alone)."""

    idea = "merge"
    label = "test merge"

    def __init__(self, make):
        self.make = make

    def start(self, binding, options, total_steps):
        make = self.make

        class Run:
            idle = False
            needs_latent = False

            def plan(self, step, plan):
                return plan.replace(merge=make(binding.grid_tokens(step.latent_shape, plan.factor)))
        return Run()


def with_planner(model, planner):
    from elastic_tokens.runtime.sampling_hooks import add_planner

    return add_planner(model, planner)


def recording_block(model, key):
    """A clone whose block ``key`` records the ``img`` and ``pe`` shapes it sees (a user's block
    patch: ours are chained in front of it)."""
    seen = []
    patched = model.clone()

    def patch(args, extra):
        seen.append((args["img"].shape[1], tuple(args["pe"].shape)))
        return extra["original_block"](args)
    patched.set_model_patch_replace(patch, "dit", key[0], key[1])
    return patched, seen


@pytest.fixture(scope="module")
def cases(pack, one_thread, tiny_flux, tiny_wan):
    return {
        "flux": (tiny_flux, tiny_models.flux_conditioning(), tiny_models.flux_latent(128, 96), 1.0),
        "wan": (tiny_wan, tiny_models.wan_conditioning(), tiny_models.wan_latent(64, 64, 9), 4.0),
    }


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_ratio_zero_is_the_plain_model_and_the_input_model_is_never_changed(cases, family):
    model, (pos, neg), latent, cfg = cases[family]
    before = options_snapshot(model)
    base = ksample(model, pos, neg, latent, cfg=cfg)
    off = token_merge(model, ratio=0.0)
    assert off is not model and torch.equal(ksample(off, pos, neg, latent, cfg=cfg), base)
    on = token_merge(model, ratio=0.5)
    assert not torch.equal(ksample(on, pos, neg, latent, cfg=cfg), base)
    assert options_snapshot(model) == before
    assert torch.equal(ksample(model, pos, neg, latent, cfg=cfg), base)  # the input still samples as before


@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_the_blocks_see_the_merged_token_count(cases, family, ratio):
    from elastic_tokens.families import binding_for

    model, (pos, neg), latent, cfg = cases[family]
    binding = binding_for(model)
    grid = binding.grid(latent["samples"].shape)
    n = grid[0] * grid[1] * grid[2]
    key = binding.block_keys[-1]
    counted, seen = recording_block(model, key)
    merged = token_merge(counted, ratio=ratio, video_mode="across_frames" if ratio == 0.25 else "within_frames")
    out = ksample(merged, pos, neg, latent, cfg=cfg)
    k = round(n * (1 - ratio))
    text = pos[0][0].shape[1] if family == "flux" else 0
    image_at = text if key in binding.text_first_blocks else 0
    pe_text = text if binding.pe_has_text else 0
    assert seen and all(t == image_at + k and pe[binding.pe_token_axis] == pe_text + k for t, pe in seen)
    rep = report(merged)
    assert rep.step_tokens == [k] * 6 and rep.step_grid_tokens == [n] * 6 and not rep.fallbacks
    assert f"{round(100 * ratio)}% of image tokens merged away on 6/6 steps" in rep.summary()
    assert torch.isfinite(out).all() and rep.flops_used < rep.flops_native


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_groups_of_one_with_proportional_attention_are_the_plain_model(cases, family):
    """Every group of size 1 runs the merge executor (index_add means, merged positions, unmerge)
    with no key bias: bit for bit the plain model."""
    from elastic_tokens.runtime.token_plan import MergePattern

    model, (pos, neg), latent, cfg = cases[family]
    base = ksample(model, pos, neg, latent, cfg=cfg)
    ident = with_planner(model, PatternPlanner(lambda n: MergePattern(torch.arange(n), n, "identity", True)))
    assert torch.equal(ksample(ident, pos, neg, latent, cfg=cfg), base)
    rep = report(ident)
    assert not rep.fallbacks and rep.step_tokens == rep.step_grid_tokens


@pytest.mark.parametrize("skip_reshape", [True, False])
@pytest.mark.parametrize("method", ["extra_dim", "mask"])
def test_proportional_attention_matches_a_dense_reference(pack, skip_reshape, method):
    """The key bias through ComfyUI's own attention function, as the override calls it: with
    log|S| = 0 it is plain attention; with a bias it is softmax(q k / sqrt(d) + bias) v."""
    from comfy.ldm.modules.attention import attention_pytorch
    from elastic_tokens.runtime.merge_path import proportional_attention

    gen = torch.Generator().manual_seed(0)
    b, h, n, d = 2, 3, 10, 16
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    sizes = torch.tensor([1, 2, 4, 1, 1, 2, 1, 4, 1, 1]).float()

    def layout(t):
        return t if skip_reshape else t.transpose(1, 2).reshape(b, n, h * d)

    def run(bias):
        return proportional_attention(attention_pytorch, layout(q), layout(k), layout(v), h, bias,
                                      skip_reshape=skip_reshape, method=method)

    plain = attention_pytorch(layout(q), layout(k), layout(v), h, skip_reshape=skip_reshape)
    assert torch.allclose(run(torch.zeros(n)), plain, atol=1e-5)
    logits = q @ k.transpose(-1, -2) / d ** 0.5 + sizes.log()
    ref = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, h * d)
    out = run(sizes.log())
    assert torch.allclose(out, ref, atol=1e-5) and not torch.allclose(out, plain, atol=1e-3)


def test_merged_keys_count_as_many_tokens_as_they_hold(pack):
    """Proportional attention's point: a key merged from |S| identical tokens gets the attention
    the |S| tokens got unmerged (same output for every query)."""
    from comfy.ldm.modules.attention import attention_pytorch
    from elastic_tokens.runtime.merge_path import proportional_attention

    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 5, 8, generator=gen)
    kv = torch.randn(2, 1, 2, 3, 8, generator=gen)
    groups = torch.tensor([0, 0, 0, 1, 2])  # keys 0-2 are one token, repeated
    full_k, full_v = kv[0][:, :, groups], kv[1][:, :, groups]
    unmerged = attention_pytorch(q, full_k, full_v, 2, skip_reshape=True)
    merged = proportional_attention(attention_pytorch, q, kv[0], kv[1], 2, torch.tensor([3.0, 1.0, 1.0]).log(),
                                    skip_reshape=True)
    assert torch.allclose(merged, unmerged, atol=1e-5)


def test_merge_path_restores_a_constant_per_group_field_and_merges_positions(pack, tiny_wan):
    """The hooks alone on Wan's stream: merge -> (identity block) -> unmerge gives back a field that
    is constant on every group exactly; positions average as rotations (the mean angle)."""
    from elastic_tokens.families import binding_for
    from elastic_tokens.runtime.merge_path import MergePath, merge_rotations
    from elastic_tokens.runtime.token_plan import MergePattern

    binding = binding_for(tiny_wan)
    groups, sizes = mp.merge_pattern((2, 4, 4), 0.6, mode="both")  # pairs and fours: a key bias
    assert set(sizes.tolist()) == {2, 4}
    pattern = MergePattern(groups, sizes.numel())
    path = MergePath(binding, pattern, 32)
    pairs = path.block_patches()
    field = ts.unmerge(torch.randn(2, sizes.numel(), 6), groups)
    angles = torch.rand(32, 3) * 6
    rot = torch.stack([angles.cos(), -angles.sin(), angles.sin(), angles.cos()], -1).view(1, 32, 1, 3, 2, 2)
    before, after = pairs[binding.first_block]
    args = before({"img": field, "txt": torch.zeros(2, 4, 6), "vec": torch.zeros(2, 6, 6), "pe": rot,
                   "transformer_options": {}})
    assert args["img"].shape == (2, sizes.numel(), 6) and args["pe"].shape[1] == sizes.numel()
    override = args["transformer_options"]["optimized_attention_override"]
    assert callable(override)
    _, last = pairs[binding.last_block]
    out = last({"img": args["img"]}) if after is None else after({"img": args["img"]})
    assert torch.equal(out["img"], field)
    # any field: each token keeps its own deviation from its group's mean (residual unmerge), so
    # blocks that change nothing give the input back; copy alone gives the group means
    noisy = torch.randn(2, 32, 6)
    for mode, want in (("residual", noisy), ("copy", ts.unmerge(ts.merge(noisy, groups, sizes.numel()), groups))):
        path = MergePath(binding, pattern, 32, unmerge=mode)
        hooks = path.block_patches()
        merged = hooks[binding.first_block][0]({"img": noisy, "txt": torch.zeros(2, 4, 6), "pe": rot,
                                                "transformer_options": {}})
        restored = hooks[binding.last_block][1]({"img": merged["img"]})["img"]
        assert torch.allclose(restored, want, atol=1e-6), mode
    # the merged rotation of a group turns by the circular mean of its members' angles
    mean = merge_rotations(rot, groups, sizes.numel(), 1)
    angle = torch.atan2(mean[..., 1, 0], mean[..., 0, 0]).view(-1, 3)
    ref = torch.atan2(ts.merge(angles.sin()[None], groups, sizes.numel())[0],
                      ts.merge(angles.cos()[None], groups, sizes.numel())[0])
    assert torch.allclose(angle, ref, atol=1e-5)
    assert torch.allclose(mean[..., 0, 0] ** 2 + mean[..., 1, 0] ** 2, torch.ones(()), atol=1e-5)


def test_an_attention_override_already_present_is_wrapped_and_kept(cases):
    """A user's ``optimized_attention_override`` still sees every attention call (ours runs
    around it), and the MODEL's options keep it as it was."""
    model, (pos, neg), latent, cfg = cases["flux"]
    calls = []

    def user_override(func, *args, **kwargs):
        calls.append(args[0].shape[-1])
        return func(*args, **kwargs)

    user = model.clone()
    user.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = user_override
    base = ksample(user, pos, neg, latent, cfg=cfg)
    plain = list(calls)
    calls.clear()
    merged = token_merge(user, ratio=0.5)
    out = ksample(merged, pos, neg, latent, cfg=cfg)
    assert not torch.equal(out, base)
    # every self-attention call reached the user's override, with our key-bias dims (padded by 8)
    assert len(calls) == len(plain) and calls == [d + 8 for d in plain]
    assert user.model_options["transformer_options"]["optimized_attention_override"] is user_override
    no_bias = token_merge(user, ratio=0.5, proportional_attention=False)
    calls.clear()
    assert not torch.equal(ksample(no_bias, pos, neg, latent, cfg=cfg), out)
    assert calls == plain  # plain head dims only


def test_only_wans_self_attention_gets_the_key_bias(cases):
    """Wan's blocks call attention three ways (self, text cross, image cross for I2V): only the
    self-attention over the merged tokens gets the bias; cross-attention keys are text. Where every
    group has one size the bias is one constant on every key and is left out."""
    model, (pos, neg), latent, cfg = cases["wan"]
    calls = []

    def user_override(func, *args, **kwargs):
        calls.append((args[0].shape[-2] if kwargs.get("skip_reshape") else args[0].shape[1], args[1].shape))
        return func(*args, **kwargs)

    user = model.clone()
    user.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = user_override
    ksample(token_merge(user, ratio=0.5), pos, neg, latent, cfg=cfg)
    # ratio 0.5 on this grid: every group a pair, so log 2 on every key changes nothing: no bias
    assert len({k[-1] for _, k in calls}) == 1
    calls.clear()
    ksample(token_merge(user, ratio=0.25), pos, neg, latent, cfg=cfg)  # pairs and singletons
    self_calls = [c for c in calls if c[1][-2] == c[0]]
    cross_calls = [c for c in calls if c[1][-2] != c[0]]
    assert self_calls and cross_calls and len(self_calls) == len(cross_calls)
    plain_width = cross_calls[0][1][-1]
    assert all(k[-1] != plain_width for _, k in self_calls) and all(k[-1] == plain_width for _, k in cross_calls)


@pytest.mark.parametrize("order", ["schedule first", "merge first"])
def test_stacks_with_the_patch_schedule_into_one_plan(cases, order):
    """Coarse steps are not merged; native steps in the window are; either graph order."""
    from elastic_tokens.ideas.patch import apply_patch_schedule
    from elastic_tokens.ideas.patch.config import PatchScheduleConfig

    model, (pos, neg), latent, cfg = cases["wan"]
    sched = PatchScheduleConfig(forced_schedule="2x3")
    outs = {}
    for name, build in (("schedule first", lambda m: token_merge(apply_patch_schedule(m, sched), ratio=0.5)),
                        ("merge first", lambda m: apply_patch_schedule(token_merge(m, ratio=0.5), sched))):
        stacked = build(model)
        outs[name] = ksample(stacked, pos, neg, latent, cfg=cfg)
        rep = report(stacked)
        assert rep.step_factors == [2, 2, 2, 1, 1, 1]
        n = rep.step_grid_tokens[3]
        assert rep.step_merged == [0, 0, 0, n // 2, n // 2, n // 2]
        assert rep.step_tokens[3:] == [n // 2] * 3 and rep.step_tokens[0] == rep.step_grid_tokens[0]
        assert sorted(rep.planners) == ["Dynamic Patch Schedule", "Token Merge"] and not rep.fallbacks
    assert torch.equal(outs["schedule first"], outs["merge first"])


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_stacks_with_the_router_one_token_reduction_per_step(cases, family):
    """Token Merge and the Elastic Token Router on one MODEL, either graph order: the router takes
    the steps of its window (the first dense, to fill its caches, the others routed), Token Merge
    merges the steps before it, the log says how many steps it left, and the input is untouched."""
    from elastic_tokens.ideas.drop import apply_router
    from elastic_tokens.ideas.drop.config import RouterConfig
    from elastic_tokens.kernels.token_scores import budget_tokens

    model, (pos, neg), latent, cfg = cases[family]
    before = options_snapshot(model)

    def route(m):
        return apply_router(m, RouterConfig(budget=0.5, start_percent=0.5, refresh_every=0))

    def merge(m):
        return token_merge(m, ratio=0.5, start_percent=0.0, end_percent=1.0)

    outs = {}
    for order, build in (("router first", lambda m: merge(route(m))), ("merge first", lambda m: route(merge(m)))):
        stacked = build(model)
        outs[order] = ksample(stacked, pos, neg, latent, steps=8, cfg=cfg)
        rep = report(stacked)
        n = rep.step_grid_tokens[0]
        merged = [i for i, m in enumerate(rep.step_merged) if m]
        assert 0 < len(merged) < 8 and merged == list(range(len(merged)))  # the steps before the router's window
        assert all(rep.step_tokens[i] == n // 2 and rep.step_merged[i] == n // 2 for i in merged)
        routed = rep.step_tokens[len(merged):]
        assert routed[0] == n and set(routed[1:]) == {budget_tokens(0.5, n)}  # dense first, then the budget
        left = 8 - len(merged)
        assert f"Token Merge: {left} steps of its window had their tokens chosen by another node" in rep.summary()
        assert sorted(rep.planners) == ["Elastic Token Router", "Token Merge"] and not rep.fallbacks
        assert torch.isfinite(outs[order]).all()
    assert torch.equal(outs["router first"], outs["merge first"])
    assert options_snapshot(model) == before


def test_the_window_is_in_sampling_percent(cases):
    model, (pos, neg), latent, cfg = cases["flux"]
    merged = token_merge(model, ratio=0.5, start_percent=0.2, end_percent=0.7)
    ksample(merged, pos, neg, latent, steps=10, cfg=cfg)
    rep = report(merged)
    sampling = model.get_model_object("model_sampling")
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", 10)[:-1]
    lo, hi = sampling.percent_to_sigma(0.7), sampling.percent_to_sigma(0.2)
    want = [bool(lo < float(s) <= hi) for s in sigmas]
    assert [m > 0 for m in rep.step_merged] == want and 0 < sum(want) < 10


@pytest.mark.parametrize("order", ["easycache first", "merge first"])
def test_stacks_with_easycache(cases, order, comfy):
    from comfy_extras.nodes_easycache import EasyCacheNode

    model, (pos, neg), latent, cfg = cases["flux"]

    def easycache(m):
        return EasyCacheNode.execute(m, reuse_threshold=3.0, start_percent=0.0, end_percent=1.0,
                                     verbose=False).result[0]

    build = ((lambda m: token_merge(easycache(m), ratio=0.5)) if order == "easycache first"
             else (lambda m: easycache(token_merge(m, ratio=0.5))))
    stacked = build(model)
    out = ksample(stacked, pos, neg, latent, steps=8, cfg=cfg)
    rep = report(stacked)
    assert torch.isfinite(out).all() and out.shape == latent["samples"].shape
    # EasyCache skipped some calls; the ones that reached the transformer were merged
    assert 0 < rep.calls[1] < 8 and rep.step_merged[0] > 0 and not rep.fallbacks


def test_batch_and_cfg_merge_each_sample_alike(cases):
    """CFG (cond and uncond in one batch) and a batch of 2: each sample comes out as it does alone,
    so the merge never mixes tokens of different samples."""
    model, (pos, neg), latent, cfg = cases["wan"]
    merged = token_merge(model, ratio=0.5, video_mode="both")
    one = ksample(merged, pos, neg, latent, cfg=cfg)
    two_latent = tiny_models.wan_latent(64, 64, 9, batch=2)
    two = ksample(merged, pos, neg, two_latent, cfg=cfg)
    assert two.shape[0] == 2 and torch.allclose(two[:1], one, atol=1e-4)
    assert not torch.allclose(two[0], two[1])
    rep = report(merged)
    assert not rep.fallbacks and all(m > 0 for m in rep.step_merged)


def test_clear_errors_for_bad_settings_and_unsupported_models(cases, comfy):
    import comfy.model_patcher
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    from elastic_tokens.families import UnsupportedModelError
    from elastic_tokens.nodes.token_merge import TokenMerge

    model = cases["flux"][0]
    for bad in (0.8, -0.05, float("nan")):
        with pytest.raises(ValueError, match=r"ratio must be .*\[0, 0.75\]"):
            token_merge(model, ratio=bad)
    with pytest.raises(ValueError, match="order must be one of"):
        TokenMerge.execute(model, 0.5, "center_first", "within_frames", 0.0, 1.0)
    with pytest.raises(ValueError, match="video mode must be one of"):
        TokenMerge.execute(model, 0.5, "spread", "diagonal", 0.0, 1.0)
    with pytest.raises(ValueError, match=r"end_percent must be in \[0, 1\]"):
        token_merge(model, ratio=0.5, end_percent=1.5)
    other = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(UnsupportedModelError, match="supports Flux-family .* and Wan"):
        TokenMerge.execute(other, 0.5, "spread", "within_frames", 0.0, 1.0)
    eps_model = ModelSamplingDiscrete().patch(model, "eps", False)[0]
    with pytest.raises(UnsupportedModelError, match="flow-matching"):
        token_merge(eps_model, ratio=0.5)


def test_node_schema_and_registration(cases):
    import asyncio

    from elastic_tokens.nodes.extension import ElasticTokensExtension
    from elastic_tokens.nodes.token_merge import TokenMerge

    schema = TokenMerge.define_schema()
    inputs = {i.id: i for i in schema.inputs}
    assert list(inputs) == ["model", "ratio", "order", "video_mode", "start_percent", "end_percent",
                            "proportional_attention"]
    ratio = inputs["ratio"]
    assert (ratio.min, ratio.max, ratio.step) == (0.0, 0.75, 0.05)
    assert all(i.tooltip for i in schema.inputs) and schema.display_name == "Token Merge"
    assert TokenMerge in asyncio.run(ElasticTokensExtension().get_node_list())
    model, (pos, neg), latent, cfg = cases["flux"]
    out = TokenMerge.execute(model, 0.5, "border_first", "within_frames", 0.0, 1.0).result[0]
    ksample(out, pos, neg, latent, cfg=cfg)
    assert report(out).planners == ["Token Merge"] and report(out).step_merged[0] > 0


def test_the_server_registers_the_node_with_its_inputs(comfy_server):
    """A real ComfyUI server loads the pack and lists Token Merge with the schema's inputs."""
    info = comfy_server.object_info("ElasticTokensTokenMerge")["ElasticTokensTokenMerge"]
    assert info["display_name"] == "Token Merge" and info["output"] == ["MODEL"]
    required = info["input"]["required"]
    assert set(required) == {"model", "ratio", "order", "video_mode", "start_percent", "end_percent",
                             "proportional_attention"}
    assert required["ratio"][1]["max"] == 0.75 and required["ratio"][1]["default"] == 0.5
    combo = required["video_mode"]  # ["COMBO", {"options": [...]}] (V3) or [[...], {...}]
    options = combo[1].get("options") if combo[0] == "COMBO" else combo[0]
    assert options == ["within_frames", "across_frames", "both"]


@pytest.fixture(scope="module")
def later(comfy):
    return {"flux2": tiny_models.load_tiny_family("flux2"), "wan22_5b": tiny_models.load_tiny_family("wan22_5b")}


@pytest.mark.parametrize("name", ["flux2", "flux2_edit", "flux2_edit_timestep_zero", "kontext", "wan22_5b"])
def test_later_family_members_merge_or_say_why_not(name, pack, later, tiny_flux, one_thread):
    """Flux.2 (patch 1, its own RoPE), Flux.2 / Kontext with reference tokens after the grid (kept
    unmerged, no key bias), Wan 2.2 TI2V 5B: merged steps run with the merged token count, groups
    of one are the plain model bit for bit. Flux.2's ``index_timestep_zero`` gives the reference
    tokens their own timestep: a per-token timestep, so it runs native, counted."""
    from test_later_families import _case
    from elastic_tokens.runtime.token_plan import MergePattern

    model, pos, neg, latent, cfg, _ = _case(name, later["flux2"], later["wan22_5b"], tiny_flux)
    base = ksample(model, pos, neg, latent, cfg=cfg)
    ident = with_planner(model, PatternPlanner(lambda n: MergePattern(torch.arange(n), n, "identity", True)))
    assert torch.equal(ksample(ident, pos, neg, latent, cfg=cfg), base)
    merged = token_merge(model, ratio=0.5)
    out = ksample(merged, pos, neg, latent, cfg=cfg)
    rep = report(merged)
    assert torch.isfinite(out).all() and out.shape == base.shape
    if name == "flux2_edit_timestep_zero":
        assert set(rep.fallbacks) == {"per-token timesteps"} and torch.equal(out, base)
        return
    assert not rep.fallbacks, rep.summary()
    assert all(m == g // 2 for m, g in zip(rep.step_merged, rep.step_grid_tokens)) and not torch.equal(out, base)


def test_a_merge_of_kept_tokens_composes_with_a_token_subset(cases):
    """One token plan with both fields (a router's kept tokens, then groups of them): the executor
    chains the token path and the merge path. Groups of one over the kept tokens equal the subset
    alone bit for bit; pairs of kept tokens halve what the blocks see."""
    from elastic_tokens.families import binding_for
    from elastic_tokens.runtime.token_plan import MergePattern

    model, (pos, neg), latent, cfg = cases["flux"]
    binding = binding_for(model)

    class KeepThenMerge:
        idea = "drop"
        label = "test keep+merge"

        def __init__(self, pair):
            self.pair = pair

        def start(self, binding_, options, total_steps):
            pair = self.pair

            class Run:
                idle = False
                needs_latent = False

                def plan(self, step, plan):
                    n = binding_.grid_tokens(step.latent_shape, plan.factor)
                    keep = torch.arange(n - 1, -1, -2)  # every other token, reversed
                    k = keep.numel()
                    groups = torch.arange(k) // 2 if pair else torch.arange(k)
                    return plan.replace(keep=keep, merge=MergePattern(groups, int(groups.max()) + 1) if pair is not None
                                        else None)
            return Run()

    keep_only = ksample(with_planner(model, KeepThenMerge(None)), pos, neg, latent, cfg=cfg)
    ident = with_planner(model, KeepThenMerge(False))
    assert torch.equal(ksample(ident, pos, neg, latent, cfg=cfg), keep_only)
    counted, seen = recording_block(model, binding.block_keys[0])
    paired = with_planner(counted, KeepThenMerge(True))
    out = ksample(paired, pos, neg, latent, cfg=cfg)
    n = binding.grid_tokens(latent["samples"].shape)
    assert seen and all(t == n // 4 for t, _ in seen) and torch.isfinite(out).all()
    rep = report(paired)
    assert rep.step_tokens == [n // 4] * 6 and not rep.fallbacks


@pytest.mark.parametrize("unmerge", ["copy", "velocity", "renoise"])
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_every_unmerge_mode_with_groups_of_one_is_the_plain_model(cases, family, unmerge):
    from elastic_tokens.runtime.token_plan import MergePattern

    model, (pos, neg), latent, cfg = cases[family]
    base = ksample(model, pos, neg, latent, cfg=cfg)
    ident = with_planner(model, PatternPlanner(lambda n: MergePattern(torch.arange(n), n, "identity", True, unmerge)))
    assert torch.equal(ksample(ident, pos, neg, latent, cfg=cfg), base)


@pytest.mark.parametrize("unmerge", ["velocity", "renoise", "sigma"])
def test_velocity_unmerge_gives_each_group_one_clean_estimate_and_keeps_each_tokens_noise(pack, tiny_flux, unmerge):
    """The model sees each group's mean input patch (``renoise``: plus noise back to the step's
    level); every token's clean estimate ``x - sigma v`` is the one the model made for its group's
    input (in a merged call, one per group), whatever the model returns."""
    import inspect

    from elastic_tokens.families import binding_for
    from elastic_tokens.kernels.patchify import patchify
    from elastic_tokens.runtime.execute import _merged_velocity
    from elastic_tokens.runtime.token_plan import MergePattern

    binding = binding_for(tiny_flux)
    groups, sizes = mp.merge_pattern((6, 8), 0.5)
    pattern = MergePattern(groups, sizes.numel(), unmerge=unmerge)
    seen = {}

    def model(x, timestep, transformer_options=None):
        seen["x"], seen["t"] = x, timestep
        return torch.tanh(x * 3.0) + x.roll(1, -1)  # any per-position function

    x = torch.randn(2, 16, 12, 16)
    sigma = torch.tensor([0.7, 0.7])
    bound = inspect.signature(model).bind(x, sigma)
    v = _merged_velocity(model, bound, x, sigma, pattern, binding)
    seen_tokens, _ = patchify(seen["x"], 2)
    # the clean estimate is the one the model made for its (merged) input at the sigma it was asked
    # at (sigma: pairs' mean noise has gain 1/sqrt(2), put back on the flow path at a lower sigma')
    s_in = 0.7 * 2 ** -0.5 / (0.3 + 0.7 * 2 ** -0.5) if unmerge == "sigma" else 0.7
    assert torch.allclose(seen["t"], torch.full((2,), s_in), atol=1e-6)
    assert torch.allclose(x - 0.7 * v, seen["x"] - s_in * model(seen["x"], sigma), atol=1e-5)
    for k in (0, 5, int(groups[-1])):  # the model's input is one patch per group
        members = (groups == k).nonzero().flatten()
        assert torch.equal(seen_tokens[:, members], seen_tokens[:, members[:1]].expand(-1, len(members), -1))
    mean_in = ts.unmerge(ts.merge(patchify(x, 2)[0], groups, sizes.numel()), groups)
    extra = seen_tokens - mean_in
    if unmerge == "velocity":
        assert torch.allclose(extra, torch.zeros(()), atol=1e-6)
    elif unmerge == "sigma":  # rescaled by 1 / ((1 - s) + s g)
        assert torch.allclose(seen_tokens, mean_in / (0.3 + 0.7 * 2 ** -0.5), atol=1e-5)
    else:  # pairs: a mean of two has std 1/sqrt(2) of the noise; renoise adds the missing half back
        assert 0.4 < float(extra.std() / 0.7) ** 2 < 0.6
