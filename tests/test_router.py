"""The Elastic Token Router (ideas/drop/, nodes/elastic_token_router.py) through the real KSampler.

Tiny random-weight Flux and Wan models (tests/support/tiny_models.py) sample through ComfyUI's
own ``nodes.common_ksampler``. What is asserted: budget 1.0 is the plain model bit for bit; the
blocks see the budget's share of the image tokens on routed steps and every token on dense ones;
at one step a lower budget's kept set is a subset of a higher one's; both fill-backs do what
they say (cache per CFG branch, nearest computed token); the input MODEL is never changed;
it stacks with Dynamic Patch Schedule (either order, one plan per step) and EasyCache; batch > 1
with CFG; bad settings and unsupported models fail with a message that says what to do.
Speed is not asserted here (no GPU): bench/bench_speed.py's ``router=`` variants measure it.
"""

import functools
import math

import pytest
import torch

import node_runs
import tiny_models

STEPS = 6
ksample = functools.partial(node_runs.ksample, steps=STEPS, seed=3)  # euler/simple unless sampler= says


def router(model, **settings):
    from elastic_tokens.ideas.drop import apply_router
    from elastic_tokens.ideas.drop.config import RouterConfig

    return apply_router(model, RouterConfig(**settings))


def recording_router(model, runs: list, **settings):
    """As :func:`router`, and every sampling run's RouterRun is appended to ``runs`` (to read the
    kept indices of each step)."""
    from elastic_tokens.ideas.drop.config import RouterConfig
    from elastic_tokens.ideas.drop.planner import RouterPlanner
    from elastic_tokens.runtime.sampling_hooks import add_planner

    class Recording(RouterPlanner):
        def start(self, binding, options, total_steps):
            run = super().start(binding, options, total_steps)
            runs.append(run)
            return run
    return add_planner(model, Recording(RouterConfig(**settings)))


def report(model):
    from elastic_tokens import last_run_report

    return last_run_report(model)


def count_block_tokens(model, key):
    """A clone whose block ``key`` records the image-stream length it sees (a user's block
    patch: the runtime's hooks are chained in front of it)."""
    seen = []
    patched = model.clone()

    def patch(args, extra):
        seen.append(args["img"].shape[1])
        return extra["original_block"](args)
    patched.set_model_patch_replace(patch, "dit", key[0], key[1])
    return patched, seen


@pytest.fixture(scope="module")
def cases(pack, tiny_flux, tiny_wan, one_thread):
    return {
        "flux": (tiny_flux, tiny_models.flux_conditioning(), tiny_models.flux_latent(64, 48), 1.0),
        "wan": (tiny_wan, tiny_models.wan_conditioning(), tiny_models.wan_latent(48, 64, 5), 4.0),
    }


def _snapshot(model):
    opts = model.model_options
    to = opts.get("transformer_options", {})
    return (repr(sorted(opts)), repr(sorted(to)), repr(to.get("wrappers")), repr(to.get("patches_replace")),
            repr(getattr(model, "wrappers", None)))


# ----------------------------------------------------------------------------- identity, input model

@pytest.mark.parametrize("family", ["flux", "wan"])
def test_budget_one_is_the_plain_model_bit_for_bit_and_the_input_model_is_untouched(cases, family):
    model, (pos, neg), latent, cfg = cases[family]
    before = _snapshot(model)
    base = ksample(model, pos, neg, latent, cfg=cfg)
    full = router(model, budget=1.0, start_percent=0.0, refresh_every=0)
    assert full is not model
    assert torch.equal(ksample(full, pos, neg, latent, cfg=cfg), base)
    rep = report(full)
    assert rep.step_tokens == rep.step_grid_tokens and not rep.fallbacks
    assert any("0% of image tokens skipped, ~1.0x" in n for n in rep.notes)
    # routing a run on a clone changes nothing on the model it came from
    routed = router(model, budget=0.5, start_percent=0.0, refresh_every=0)
    assert not torch.equal(ksample(routed, pos, neg, latent, cfg=cfg), base)
    assert _snapshot(model) == before and report(model) is None
    assert torch.equal(ksample(model, pos, neg, latent, cfg=cfg), base)


# ----------------------------------------------------------------------------- tokens per step

@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize("fill", ["cache", "nearest"])
def test_blocks_see_the_budgets_share_on_routed_steps_and_every_token_on_dense_ones(cases, family, fill):
    from elastic_tokens.families import binding_for
    from elastic_tokens.kernels.token_scores import budget_tokens

    model, (pos, neg), latent, cfg = cases[family]
    binding = binding_for(model)
    n = binding.grid_tokens(latent["samples"].shape)
    k = budget_tokens(0.5, n)
    key = binding.block_keys[-1]
    counted, seen = count_block_tokens(model, key)
    routed = router(counted, budget=0.5, start_percent=0.0, refresh_every=3, fill=fill)
    out = ksample(routed, pos, neg, latent, cfg=cfg)
    assert torch.isfinite(out).all()
    rep = report(routed)
    # step 0: no update to score yet (dense); every 3rd step of the window dense again
    assert rep.step_tokens == [n, k, k, n, k, k] and rep.step_grid_tokens == [n] * STEPS
    assert [s.get("router_kept") for s in rep.step_scores] == rep.step_tokens
    text = pos[0][0].shape[1] if key in binding.text_first_blocks else 0
    calls_per_step = 1  # cond and uncond are batched into one call on these tiny models
    assert seen == [text + t for t in rep.step_tokens for _ in range(calls_per_step)]
    skipped = 1 - sum(rep.step_tokens) / sum(rep.step_grid_tokens)
    assert f"{100 * skipped:.0f}% of image tokens skipped, ~{rep.estimated_speedup:.1f}x" in rep.summary()
    assert rep.flops_used < rep.flops_native


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_the_flop_account_counts_the_attention_over_cached_keys(cases, family):
    """With ``attend_skipped`` a routed step's kept tokens attend to every token's keys: the
    account (log line, report, bench rows) counts that attention."""
    from elastic_tokens.families import binding_for
    from elastic_tokens.kernels.token_scores import budget_tokens

    model, (pos, neg), latent, cfg = cases[family]
    binding = binding_for(model)
    shape = latent["samples"].shape
    n = binding.grid_tokens(shape)
    k = budget_tokens(0.5, n)
    text = pos[0][0].shape[1]
    calls = 2 if cfg != 1.0 else 1  # cond and uncond batched into one call of two samples
    settings = dict(budget=0.5, start_percent=0.0, refresh_every=3)
    used = {}
    for name, extra in (("off", dict(attend_skipped=False)), ("on", {})):
        routed = router(model, **settings, **extra)
        ksample(routed, pos, neg, latent, cfg=cfg)
        rep = report(routed)
        assert rep.step_tokens == [n, k, k, n, k, k]
        used[name] = rep.flops_used
    dense, routed_steps = 2, 4
    blocks = len(binding.block_keys)
    expect = {"off": binding.step_flops(k, text), "on": binding.step_flops(k, text, n)}
    for name, per_routed in expect.items():
        assert used[name] == pytest.approx(calls * (dense * binding.step_flops(n, text) + routed_steps * per_routed))
    assert used["off"] < used["on"]
    # the same counted through step_flops's parts: the extra is attention of kept queries over skipped keys
    assert binding.step_flops(k, text, n) - binding.step_flops(k, text) == pytest.approx(
        blocks * 4.0 * (k + (text if binding.joint_text else 0)) * (n - k) * binding.hidden_size)


def test_the_window_follows_comfyuis_percent_to_sigma(cases):
    """start/end percent are read as EasyCache reads them: a step is routed when
    ``percent_to_sigma(end) < sigma <= percent_to_sigma(start)`` (sigmas compared in float32,
    as ComfyUI's tensors are); its first step is dense (the cache is filled)."""
    import comfy.samplers

    model, (pos, neg), latent, cfg = cases["flux"]
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", STEPS)[:-1].float()
    for start, end in ((0.5, 1.0), (0.0, 0.5), (0.3, 0.8), (0.6, 0.6)):
        routed = router(model, budget=0.5, start_percent=start, end_percent=end, refresh_every=0)
        ksample(routed, pos, neg, latent, cfg=cfg)
        rep = report(routed)
        n = rep.step_grid_tokens[0]
        got = "".join("k" if t < n else ("d" if s.get("router_kept") == n else "-")
                      for t, s in zip(rep.step_tokens, rep.step_scores))
        hi = torch.tensor(sampling.percent_to_sigma(start), dtype=torch.float32)
        lo = torch.tensor(sampling.percent_to_sigma(end), dtype=torch.float32)
        inside = "".join("x" if lo < s <= hi else "-" for s in sigmas)
        expect = inside.replace("x", "d", 1).replace("x", "k")
        assert got == expect, (start, end, got, inside)
    assert expect == "------"  # the empty window: no effect at all


# ----------------------------------------------------------------------------- elastic ordering

@pytest.mark.parametrize("family", ["flux", "wan"])
def test_a_lower_budgets_kept_set_is_a_subset_of_a_higher_ones_at_the_same_step(cases, family):
    model, (pos, neg), latent, cfg = cases[family]
    kept = {}
    for budget in (0.3, 0.5, 0.8):
        runs = []
        ksample(recording_router(model, runs, budget=budget, start_percent=0.0, refresh_every=0), pos, neg,
                latent, cfg=cfg)
        (run,) = runs
        kept[budget] = run.kept
    # step 1 is the first routed step of every run: the same trajectory so far (step 0 dense in
    # all), the same scores, so the sets must nest
    first = [set(kept[b][1].tolist()) for b in (0.3, 0.5, 0.8)]
    assert first[0] < first[1] < first[2]
    assert all(len(kept[b]) == STEPS - 1 for b in kept)


# ----------------------------------------------------------------------------- fill-back

def test_cache_fill_keeps_one_cache_per_branch_and_fills_skipped_tokens_from_it(pack):
    from elastic_tokens.ideas.drop.fill import CacheFill, FillState, NearestFill

    state = FillState()
    options = {"uuids": ["cond", "uncond"], "cond_or_uncond": [0, 1]}
    dense = torch.randn(4, 6, 3)  # two chunks of batch 2, 6 tokens
    out = CacheFill(state, dense=True)(dense, torch.arange(6), options)
    assert torch.equal(out, dense) and set(state.cache) == {"cond", "uncond"}
    keep = torch.tensor([1, 4])
    step = torch.randn(4, 6, 3)
    out = CacheFill(state, dense=False)(step, keep, options)
    skipped = [0, 2, 3, 5]
    assert torch.equal(out[:, keep], step[:, keep]) and torch.equal(out[:, skipped], dense[:, skipped])
    # the branches come apart by uuid, whatever order ComfyUI batches them in next time
    swapped = {"uuids": ["uncond", "cond"], "cond_or_uncond": [1, 0]}
    later = torch.randn(4, 6, 3)
    out = CacheFill(state, dense=False)(later, torch.tensor([0]), swapped)
    assert torch.equal(out[:2, 2], dense[2:, 2]) and torch.equal(out[2:, 2], dense[:2, 2])
    assert torch.equal(out[:2, 4], step[2:, 4]) and torch.equal(out[:, 0], later[:, 0])
    # the uncond branch alone in a call (ComfyUI splits when memory is short) finds its own cache
    alone = CacheFill(state, dense=False)(torch.randn(2, 6, 3), torch.tensor([0]), {"uuids": ["uncond"]})
    assert torch.equal(alone[:, 4], step[2:, 4]) and state.missing == 0
    CacheFill(state, dense=False)(torch.randn(2, 6, 3), torch.tensor([0]), {"uuids": ["new cond"]})
    assert state.missing == 1
    # nearest: every token copies the computed token it maps to
    grid = torch.randn(1, 4, 2)
    src = torch.tensor([0, 0, 3, 3])
    assert torch.equal(NearestFill(src)(grid, torch.tensor([0, 3]), {}), grid[:, [0, 0, 3, 3]])


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_the_fill_backs_change_the_result_and_cache_differs_from_the_input_fill(cases, family):
    """Three ways to fill the same kept tokens give three different images: the fill is used."""
    from elastic_tokens.runtime.sampling_hooks import add_planner

    model, (pos, neg), latent, cfg = cases[family]
    runs = []
    cache = ksample(recording_router(model, runs, budget=0.5, start_percent=0.0, refresh_every=0), pos, neg,
                    latent, cfg=cfg)
    kept = runs[0].kept

    class SameKeep:  # the router's kept tokens, filled with their pre-block state (no fill)
        idea, label = "drop", "same keep"

        def start(self, binding, options, total_steps):
            class Run:
                idle, needs_latent = False, False

                def plan(self, step, plan):
                    return plan.replace(keep=kept[step.step]) if step.step in kept else plan
            return Run()

    no_fill = ksample(add_planner(model, SameKeep()), pos, neg, latent, cfg=cfg)
    nearest = ksample(router(model, budget=0.5, start_percent=0.0, refresh_every=0, fill="nearest"), pos, neg,
                      latent, cfg=cfg)
    for a, b in ((cache, no_fill), (cache, nearest), (no_fill, nearest)):
        assert torch.isfinite(a).all() and not torch.equal(a, b)


# ----------------------------------------------------------------------------- stacking

def test_stacks_with_the_patch_schedule_in_either_order_one_plan_per_step(cases):
    from elastic_tokens.ideas.patch import apply_patch_schedule
    from elastic_tokens.ideas.patch.config import PatchScheduleConfig

    model, (pos, neg), latent, cfg = cases["flux"]
    schedule = PatchScheduleConfig(forced_schedule="1x1,2x2")
    settings = dict(budget=0.5, start_percent=0.0, refresh_every=0)
    outs = []
    for stacked in (apply_patch_schedule(router(model, **settings), schedule),
                    router(apply_patch_schedule(model, schedule), **settings)):
        outs.append(ksample(stacked, pos, neg, latent, cfg=cfg))
        rep = report(stacked)
        n, coarse = rep.step_grid_tokens[0], rep.step_grid_tokens[1]
        assert rep.step_factors == [1, 2, 2, 1, 1, 1] and coarse < n
        # step 0 dense (no score yet); coarse steps run their whole grid; the first native step
        # after them is dense (the cache missed two steps); then routed
        assert rep.step_tokens == [n, coarse, coarse, n, n // 2, n // 2]
        assert sorted(rep.planners) == ["Dynamic Patch Schedule", "Elastic Token Router"]
    assert torch.equal(outs[0], outs[1])


def test_stacks_with_easycache_in_either_order(cases, comfy):
    from comfy_extras.nodes_easycache import EasyCacheNode

    model, (pos, neg), latent, cfg = cases["flux"]

    def easycache(m):
        return EasyCacheNode.execute(m, reuse_threshold=3.0, start_percent=0.0, end_percent=1.0,
                                     verbose=False).result[0]

    settings = dict(budget=0.5, start_percent=0.0, refresh_every=0)
    for build in (lambda m: router(easycache(m), **settings), lambda m: easycache(router(m, **settings))):
        stacked = build(model)
        out = ksample(stacked, pos, neg, latent, steps=8, cfg=cfg)
        rep = report(stacked)
        assert torch.isfinite(out).all() and out.shape == latent["samples"].shape
        # EasyCache skipped some transformer calls (our wrapper is innermost, so skipped calls
        # never reach it) and the router routed some of the rest
        assert 0 < rep.calls[1] < 8
        assert 0 < sum(1 for t, g in zip(rep.step_tokens, rep.step_grid_tokens) if 0 < t < g)


def test_batch_of_two_with_cfg_on_wan(pack, tiny_wan, one_thread):
    pos, neg = tiny_models.wan_conditioning(batch=1)
    latent = tiny_models.wan_latent(48, 64, 5, batch=2)
    base = ksample(tiny_wan, pos, neg, latent, cfg=5.0)
    assert torch.equal(ksample(router(tiny_wan, budget=1.0), pos, neg, latent, cfg=5.0), base)
    runs = []
    routed = recording_router(tiny_wan, runs, budget=0.5, start_percent=0.0, refresh_every=0)
    out = ksample(routed, pos, neg, latent, cfg=5.0)
    rep = report(routed)
    n = rep.step_grid_tokens[0]
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert rep.step_tokens == [n] + [n // 2] * (STEPS - 1)
    assert not any("no cached output" in note for note in rep.notes)  # both branches found their cache
    # one kept set per sample and step, from the sample's own scores
    kept = runs[0].kept
    assert all(k.shape == (2, n // 2) for k in kept.values())
    assert any(not torch.equal(k[0], k[1]) for k in kept.values())


@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize("fill,attend", [("cache", True), ("cache", False), ("nearest", False)])
def test_each_sample_of_a_batch_is_routed_as_if_alone(cases, family, fill, attend):
    """Per-sample kept sets: a sample's image in a batch of two (with CFG) is its image sampled
    alone, and so are its kept sets, for every fill-back and with the K/V cache. A shared kept set
    (scores averaged over the batch) fails this: the second sample's scores would move the first
    one's tokens. (``nearest`` copies whole tokens, so a float-rounding difference between batch
    sizes can flip a near tie of the next step's ranking: it is compared over its first 3 steps.)"""
    model, (pos, neg), _, _ = cases[family]
    latent = (tiny_models.wan_latent(48, 64, 5, batch=2) if family == "wan"
              else tiny_models.flux_latent(64, 64, batch=2))
    settings = dict(budget=0.5, start_percent=0.0, refresh_every=0, fill=fill, attend_skipped=attend)
    steps = 3 if fill == "nearest" else STEPS
    runs, runs_alone = [], []
    both = ksample(recording_router(model, runs, **settings), pos, neg, latent, steps=steps, cfg=4.0)
    alone = ksample(recording_router(model, runs_alone, **settings), pos, neg,
                    {"samples": latent["samples"][:1]}, steps=steps, cfg=4.0)
    kept, kept_alone = runs[0].kept, runs_alone[0].kept
    assert kept.keys() == kept_alone.keys() and len(kept) == steps - 1
    assert all(torch.equal(kept[s][0], kept_alone[s]) for s in kept)
    assert any(not torch.equal(k[0], k[1]) for k in kept.values())  # the two samples differ
    assert torch.allclose(both[:1], alone, atol=1e-4, rtol=1e-4), (both[:1] - alone).abs().max()


def count_branch_tokens(model, key):
    """A clone whose block ``key`` records (batch, image-stream length) of every call."""
    seen = []
    patched = model.clone()

    def patch(args, extra):
        seen.append(tuple(args["img"].shape[:2]))
        return extra["original_block"](args)
    patched.set_model_patch_replace(patch, "dit", key[0], key[1])
    return patched, seen


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_a_lower_uncond_budget_runs_the_uncond_branch_on_fewer_tokens(cases, family):
    """Lite-CFG: with uncond_budget below budget the two CFG branches run as separate calls on
    routed (and the window's dense) steps, the uncond one on its own share, a subset of the cond
    branch's tokens; the token-FLOPs fall accordingly. uncond_budget 1.0 changes nothing (bit for
    bit the budget-only router), and without CFG (cfg 1) there is no uncond branch to split."""
    from elastic_tokens.families import binding_for
    from elastic_tokens.kernels.token_scores import budget_tokens

    model, (pos, neg), latent, cfg = cases[family]
    cfg = 4.0
    binding = binding_for(model)
    n = binding.grid_tokens(latent["samples"].shape)
    settings = dict(budget=0.5, start_percent=0.0, refresh_every=0)
    plain = ksample(router(model, **settings), pos, neg, latent, cfg=cfg)
    assert torch.equal(ksample(router(model, uncond_budget=1.0, **settings), pos, neg, latent, cfg=cfg), plain)
    assert torch.equal(ksample(router(model, uncond_budget=0.8, **settings), pos, neg, latent, cfg=cfg), plain)

    counted, seen = count_branch_tokens(model, binding.first_block)
    runs = []
    lite = recording_router(counted, runs, uncond_budget=0.2, **settings)
    out = ksample(lite, pos, neg, latent, cfg=cfg)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    run = runs[0]
    k, k_u = budget_tokens(0.5, n), budget_tokens(0.2, n)
    assert sorted(run.kept_uncond) == sorted(run.kept) and len(run.kept) == STEPS - 1
    for step, keep_u in run.kept_uncond.items():
        assert keep_u.shape[-1] == k_u and set(keep_u.tolist()) <= set(run.kept[step].tolist())
    lengths = [length for _, length in seen]  # the first block's image stream (Flux: txt apart)
    assert all(b == 1 for b, _ in seen)  # one call per branch (latent batch 1)
    assert lengths[:2] == [n, n]  # the first (dense) step: both branches, every token
    assert lengths[2:] == [k, k_u] * (STEPS - 1)
    rep = report(lite)
    plain_run = router(model, **settings)
    ksample(plain_run, pos, neg, latent, cfg=cfg)
    assert report(lite).estimated_speedup > report(plain_run).estimated_speedup
    assert any("uncond branch at budget 0.2" in note for note in rep.notes)
    # cfg 1: no uncond branch, nothing to split: the budget-only router's image
    one = ksample(router(model, uncond_budget=0.2, **settings), pos, neg, latent, cfg=1.0)
    assert torch.equal(one, ksample(router(model, **settings), pos, neg, latent, cfg=1.0))


def test_the_uncond_budget_alone_routes_only_the_uncond_branch(cases):
    """budget 1.0 with a lower uncond_budget: the cond branch runs every token, only the uncond
    one is routed (the node is not a no-op)."""
    from elastic_tokens.families import binding_for

    model, (pos, neg), latent, _ = cases["flux"]
    binding = binding_for(model)
    n = binding.grid_tokens(latent["samples"].shape)
    counted, seen = count_branch_tokens(model, binding.first_block)
    out = ksample(router(counted, budget=1.0, uncond_budget=0.5, start_percent=0.0, refresh_every=0),
                  pos, neg, latent, cfg=4.0)
    lengths = [length for _, length in seen]
    assert lengths[2:] == [n, n // 2] * (STEPS - 1) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- errors, node

@pytest.mark.parametrize("budget", [0.05, 0.0, 1.5, -1.0, math.nan, True, "0.5"])
def test_bad_budgets_are_refused_with_the_allowed_range(pack, budget):
    from elastic_tokens.ideas.drop.config import RouterConfig

    with pytest.raises(ValueError, match="budget must be a share of image tokens between 0.1 and 1.0"):
        RouterConfig(budget=budget)


def test_other_bad_settings_name_the_allowed_values(pack):
    from elastic_tokens.ideas.drop.config import RouterConfig

    with pytest.raises(ValueError, match="scorer must be one of ras, context, change"):
        RouterConfig(scorer="entropy")
    with pytest.raises(ValueError, match="fill must be one of cache, nearest"):
        RouterConfig(fill="zeros")
    with pytest.raises(ValueError, match=r"start_percent must be in \[0, 1\]"):
        RouterConfig(start_percent=1.5)
    with pytest.raises(ValueError, match="refresh_every must be a whole number"):
        RouterConfig(refresh_every=-1)


def test_the_node_on_an_unsupported_model_says_which_models_it_supports(pack):
    import comfy.model_patcher

    from elastic_tokens.families import UnsupportedModelError
    from elastic_tokens.nodes.elastic_token_router import ElasticTokenRouter

    other = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(UnsupportedModelError, match="supports Flux-family .* and Wan"):
        ElasticTokenRouter.execute(other, 0.5, "ras", "cache", 0.2, 1.0, 5)


def test_the_node_has_tooltips_and_runs_through_its_schema(cases):
    from elastic_tokens.nodes.elastic_token_router import ElasticTokenRouter

    import asyncio

    from elastic_tokens.nodes.extension import ElasticTokensExtension

    assert ElasticTokenRouter in asyncio.run(ElasticTokensExtension().get_node_list())
    schema = ElasticTokenRouter.define_schema()
    assert schema.display_name == "Elastic Token Router"
    inputs = {i.id: i for i in schema.inputs}
    assert list(inputs) == ["model", "budget", "scorer", "fill", "start_percent", "end_percent", "refresh_every",
                            "attend_skipped", "uncond_budget"]
    assert all(i.tooltip for i in inputs.values())
    assert (inputs["budget"].min, inputs["budget"].max) == (0.1, 1.0)
    assert (inputs["uncond_budget"].min, inputs["uncond_budget"].max, inputs["uncond_budget"].default) == (0.1, 1.0, 1.0)
    model, (pos, neg), latent, cfg = cases["flux"]
    out = ElasticTokenRouter.execute(model, 0.5, "context", "nearest", 0.0, 1.0, 0).result[0]
    ksample(out, pos, neg, latent, cfg=cfg)
    assert report(out).planners == ["Elastic Token Router"]
    with pytest.raises(ValueError, match="budget"):
        ElasticTokenRouter.execute(model, 0.0, "ras", "cache", 0.2, 1.0, 5)


# ----------------------------------------------------------------------------- later family members

@pytest.mark.parametrize("name", ["flux2", "flux2_edit", "kontext", "wan22_5b"])
def test_later_family_members_route_or_say_why_not(name, pack, comfy, tiny_flux, one_thread):
    """Flux.2 (patch 1, 128 channels), Flux.2 with a reference image and Flux Kontext (reference
    tokens after the grid: always kept) route; budget 1.0 stays the plain model. Wan 2.2 TI2V 5B's
    calls with per-token timesteps run every token and are counted as such."""
    from test_later_families import _case

    flux2 = tiny_models.load_tiny_family("flux2") if name.startswith("flux2") else None
    wan22 = tiny_models.load_tiny_family("wan22_5b") if name == "wan22_5b" else None
    model, pos, neg, latent, cfg, _ = _case(name, flux2, wan22, tiny_flux)
    base = ksample(model, pos, neg, latent, cfg=cfg)
    assert torch.equal(ksample(router(model, budget=1.0, start_percent=0.0), pos, neg, latent, cfg=cfg), base)
    routed = router(model, budget=0.5, start_percent=0.0, refresh_every=0)
    out = ksample(routed, pos, neg, latent, cfg=cfg)
    rep = report(routed)
    assert torch.isfinite(out).all() and out.shape == base.shape
    routed_steps = sum(1 for t, g in zip(rep.step_tokens, rep.step_grid_tokens) if t < g)
    if rep.fallbacks:
        assert set(rep.fallbacks) <= {"per-token timesteps"}, rep.fallbacks
    else:
        assert routed_steps == STEPS - 1 and not torch.equal(out, base)


# ----------------------------------------------------------------------------- attend_skipped

def test_attending_to_cached_keys_values_gives_the_full_attention_rows_of_the_kept_tokens(pack, tiny_flux):
    """What ``attend_skipped`` computes, through ComfyUI's own optimized_attention: a dense call
    fills the cache and passes through unchanged; a routed call whose skipped tokens' keys/values
    did not change since equals full attention on the kept rows (text and kept image queries)."""
    from comfy.ldm.modules.attention import optimized_attention

    from elastic_tokens.families import binding_for
    from elastic_tokens.ideas.drop.attend import AttendSkipped, KVState

    binding = binding_for(tiny_flux)
    key = binding.block_keys[0]
    b, heads, text, n, d = 2, 2, 3, 10, 4
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, heads, text + n, d, generator=gen) for _ in range(3))
    options = {"uuids": ["cond", "uncond"]}
    txt = torch.zeros(b, text, 8)

    def attend(hook_options, q, k, v):
        hook = hook_options["patches_replace"]["dit"][key]
        out = {}
        hook({"txt": txt, "img": None}, {"original_block": lambda args: out.setdefault(
            "x", optimized_attention(q, k, v, heads, skip_reshape=True, transformer_options=hook_options))})
        return out["x"]

    full = optimized_attention(q, k, v, heads, skip_reshape=True)
    state = KVState()
    every = torch.arange(n)
    dense = AttendSkipped(state, binding, every, n, dense=True)
    assert torch.equal(attend(dense(options), q, k, v), full)
    assert len(state.cache) == 1  # one entry per batch layout (cond, uncond) and block
    k_before = k.clone()
    keep = torch.tensor([1, 4, 5, 8])
    rows = torch.cat([torch.arange(text), keep + text])
    routed = AttendSkipped(state, binding, keep, n, dense=False)
    out = attend(routed(options), q[:, :, rows], k[:, :, rows], v[:, :, rows])
    assert torch.allclose(out, full[:, rows], atol=1e-5)
    without = optimized_attention(q[:, :, rows], k[:, :, rows], v[:, :, rows], heads, skip_reshape=True)
    assert not torch.allclose(without, full[:, rows], atol=1e-3)  # the skipped keys mattered
    assert state.missing == 0 and state.unexpected == 0
    assert torch.equal(k, k_before)  # the cache is a copy: renewing it in place leaves the call's keys
    # a selection per row of the batch: each row's own kept tokens (text first, as the stream has it)
    keep2 = torch.tensor([[1, 4, 5, 8], [0, 2, 3, 9]])
    rows2 = torch.cat([torch.arange(text).expand(b, -1), keep2 + text], dim=1)
    pick = lambda t: torch.stack([t[i][:, rows2[i]] for i in range(b)])  # noqa: E731
    routed2 = AttendSkipped(state, binding, keep2, n, dense=False)
    out2 = attend(routed2(options), pick(q), pick(k), pick(v))
    assert torch.allclose(out2, torch.stack([full[i, rows2[i]] for i in range(b)]), atol=1e-5)
    # the branches batched in the other order: no cache for that layout, runs without and is counted
    attend(routed({"uuids": ["uncond", "cond"]}), q[:, :, rows], k[:, :, rows], v[:, :, rows])
    assert state.missing == 1


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_attend_skipped_through_the_ksampler_wraps_an_existing_override(cases, family):
    from elastic_tokens.families import binding_for
    from elastic_tokens.kernels.token_scores import budget_tokens

    model, (pos, neg), latent, cfg = cases[family]
    binding = binding_for(model)
    n = binding.grid_tokens(latent["samples"].shape)
    k = budget_tokens(0.5, n)
    text = pos[0][0].shape[1] if binding.joint_text else 0
    seen = []

    def users_override(func, *args, **kwargs):  # another node's attention override: still runs
        seen.append((args[0].shape[2 if kwargs.get("skip_reshape") else 1],
                     args[1].shape[2 if kwargs.get("skip_reshape") else 1]))
        return func(*args, **kwargs)
    users = model.clone()
    users.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = users_override
    base = ksample(users, pos, neg, latent, cfg=cfg)
    assert seen
    # every step dense: the cache fills, nothing else changes
    assert torch.equal(ksample(router(users, budget=0.5, start_percent=0.0, refresh_every=1, attend_skipped=True),
                               pos, neg, latent, cfg=cfg), base)
    seen.clear()
    routed = router(users, budget=0.5, start_percent=0.0, refresh_every=0, attend_skipped=True)
    out = ksample(routed, pos, neg, latent, cfg=cfg)
    blocks = len(binding.block_keys)
    self_attn = [s for s in seen if s[1] >= s[0]]  # (Wan's cross-attention reads the 8 text tokens)
    # step 0 dense (n queries, n keys), then kept queries with every token's keys
    assert self_attn[:blocks] == [(text + n, text + n)] * blocks
    assert self_attn[blocks:] == [(text + k, text + n)] * (blocks * (STEPS - 1))
    plain_drop = ksample(router(model, budget=0.5, start_percent=0.0, refresh_every=0, attend_skipped=False),
                         pos, neg, latent, cfg=cfg)
    assert torch.isfinite(out).all() and not torch.equal(out, plain_drop)
    assert "attended to the skipped ones' cached keys/values" in report(routed).summary()
    assert "without a cache" not in report(routed).summary()


# ----------------------------------------------------------------------------- scorers, samplers

def test_each_scorer_ranks_by_its_own_signal(cases):
    """The three scorers read different signals of one trajectory: at the first step where all
    three have what they need (step 2: three latents), their kept sets differ (bare scores: the
    age weighting, the same for all three, is off)."""
    model, (pos, neg), latent, cfg = cases["wan"]
    kept = {}
    for scorer in ("ras", "context", "change"):
        runs = []
        ksample(recording_router(model, runs, budget=0.5, start_percent=0.0, refresh_every=0, scorer=scorer,
                                 starvation=0.0, age_weight=False), pos, neg, latent, cfg=cfg)
        kept[scorer] = [set(runs[0].kept[s].tolist()) for s in (1, 2)]
    assert kept["ras"][0] == kept["change"][0]  # change has only two latents at step 1: it reads ras
    assert kept["ras"][1] != kept["change"][1] and kept["ras"][1] != kept["context"][1]


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m"])
def test_multi_evaluation_and_multistep_samplers_share_one_plan_per_step(cases, sampler):
    from elastic_tokens.families import binding_for

    model, (pos, neg), latent, cfg = cases["flux"]
    binding = binding_for(model)
    counted, seen = count_block_tokens(model, binding.block_keys[0])
    routed = router(counted, budget=0.5, start_percent=0.0, refresh_every=0)
    out = ksample(routed, pos, neg, latent, cfg=cfg, sampler=sampler)
    rep = report(routed)
    n = binding.grid_tokens(latent["samples"].shape)
    assert torch.isfinite(out).all() and rep.step_tokens[0] == n and set(rep.step_tokens[1:]) == {n // 2}
    assert set(seen) == {n, n // 2} and len(seen) == sum(rep.calls.values())
    assert not any("no cached output" in note for note in rep.notes)


# ----------------------------------------------------------------------------- real server

def test_the_node_runs_in_a_real_server_and_logs_what_it_skipped(comfy_server):
    """The node as a user meets it: listed by /object_info with its inputs, run through /prompt on
    the tiny Wan (CFG, uni_pc), its log line in the server's log."""
    import re

    from test_runtime import _wan_prompt

    info = comfy_server.object_info("ElasticTokensTokenRouter")["ElasticTokensTokenRouter"]
    assert info["display_name"] == "Elastic Token Router" and info["output"] == ["MODEL"]
    required = info["input"]["required"]
    assert required["budget"][1]["min"] == 0.1 and required["budget"][1]["default"] == 0.5
    scorer = required["scorer"]  # a list of options, or "COMBO" with them in its settings
    assert (scorer[0] if scorer[0] != "COMBO" else scorer[1]["options"]) == ["ras", "context", "change", "learned"]
    prompt = _wan_prompt()
    prompt["10"] = {"class_type": "ElasticTokensTokenRouter",
                    "inputs": {"model": ["1", 0], "budget": 0.5, "scorer": "ras", "fill": "cache",
                               "start_percent": 0.0, "end_percent": 1.0, "refresh_every": 0,
                               "attend_skipped": False}}
    prompt["6"]["inputs"]["model"] = ["10", 0]
    prompt["9"]["inputs"]["filename_prefix"] = "tiny_wan_router"
    entry = comfy_server.run(prompt, timeout=180)
    assert comfy_server.output_files(entry, "9")
    # 4 steps: the first dense, three at half the tokens: 3/8 of the image tokens skipped
    assert re.search(r"Elastic Token Router: 38% of image tokens skipped, ~\d\.\dx \(budget 0\.5, 3 routed and 1 "
                     r"dense steps", comfy_server.log_text()), comfy_server.log_text()[-3000:]
