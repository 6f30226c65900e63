"""The token plan runtime (runtime/): one plan per step, executed through the real KSampler.

A planner here is a test planner of the "drop" idea that keeps a given subset of the image tokens;
the router (issue 13) will be one like it. What is asserted: keeping every token in order is the
plain model bit for bit (Flux and Wan), the blocks see exactly the kept tokens with their
positions, planners compose in idea order whatever the graph order, and a merge plan that does
not fit the call's grid falls back to native and is counted.
"""

import pytest
import torch

import tiny_models
from node_runs import ksample


class KeepPlanner:
    """Keeps ``pick(grid_tokens)`` of the step's grid (at the plan's patch factor)."""

    idea = "drop"
    label = "test keep"

    def __init__(self, pick):
        self.pick = pick

    def start(self, binding, options, total_steps):
        planner = self

        class Run:
            idle = False
            needs_latent = False

            def plan(self, step, plan):
                grid = binding.grid_tokens(step.latent_shape, plan.factor)
                return plan.replace(keep=planner.pick(grid))
        return Run()


def with_planner(model, planner):
    from elastic_tokens.runtime.sampling_hooks import add_planner

    return add_planner(model, planner)


def count_block_tokens(model, key):
    """A clone whose block ``key`` records the image tokens it sees (a user's block patch: ours
    are chained in front of it)."""
    seen = []
    patched = model.clone()

    def patch(args, extra):
        seen.append((args["img"].shape[1], args["pe"].shape))
        return extra["original_block"](args)
    patched.set_model_patch_replace(patch, "dit", key[0], key[1])
    return patched, seen


@pytest.fixture(scope="module")
def cases(pack, tiny_flux, tiny_wan):
    return {
        "flux": (tiny_flux, tiny_models.flux_conditioning(), tiny_models.flux_latent(64, 48), 1.0),
        "wan": (tiny_wan, tiny_models.wan_conditioning(), tiny_models.wan_latent(48, 64, 5), 4.0),
    }


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_keeping_every_token_in_order_is_the_plain_model(cases, family):
    from elastic_tokens import last_run_report

    model, (pos, neg), latent, cfg = cases[family]
    base = ksample(model, pos, neg, latent, cfg=cfg)
    noop = with_planner(model, KeepPlanner(lambda n: torch.arange(n)))
    out = ksample(noop, pos, neg, latent, cfg=cfg)
    assert torch.equal(out, base)
    rep = last_run_report(noop)
    assert rep.planners == ["test keep"] and not rep.fallbacks
    assert rep.step_tokens == rep.step_grid_tokens and rep.step_tokens[0] > 0


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_blocks_see_exactly_the_kept_tokens_and_their_positions(cases, family):
    from elastic_tokens import last_run_report
    from elastic_tokens.families import binding_for

    model, (pos, neg), latent, cfg = cases[family]
    binding = binding_for(model)
    grid = binding.grid_tokens(latent["samples"].shape)
    keep = torch.arange(grid - 1, -1, -3)  # every third token, in reverse order
    base = ksample(model, pos, neg, latent, cfg=cfg)
    counted, seen = count_block_tokens(model, binding.block_keys[1])
    out = ksample(with_planner(counted, KeepPlanner(lambda n: keep)), pos, neg, latent, cfg=cfg)
    text = pos[0][0].shape[1] if family == "flux" else 0
    image_at = 0 if binding.block_keys[1] not in binding.text_first_blocks else text
    assert seen and all(n == image_at + len(keep) for n, _ in seen)
    assert all(shape[binding.pe_token_axis] == len(keep) + (text if binding.pe_has_text else 0) for _, shape in seen)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    rep = last_run_report(with_planner(model, KeepPlanner(lambda n: keep)))
    assert rep is None  # a fresh clone has not sampled yet
    model_run = with_planner(model, KeepPlanner(lambda n: keep))
    ksample(model_run, pos, neg, latent, cfg=cfg)
    rep = last_run_report(model_run)
    assert rep.step_tokens == [len(keep)] * 6 and rep.step_grid_tokens == [grid] * 6
    assert rep.flops_used < rep.flops_native and "image tokens skipped" in rep.summary()


def test_patch_and_drop_compose_in_idea_order_whatever_the_graph_order(cases):
    from elastic_tokens import last_run_report
    from elastic_tokens.ideas.patch import apply_patch_schedule
    from elastic_tokens.ideas.patch.config import PatchScheduleConfig

    model, (pos, neg), latent, cfg = cases["flux"]
    half = KeepPlanner(lambda n: torch.arange(0, n, 2))
    config = PatchScheduleConfig(forced_schedule="2x3")
    outs = []
    for stacked in (apply_patch_schedule(with_planner(model, half), config),
                    with_planner(apply_patch_schedule(model, config), half)):
        outs.append(ksample(stacked, pos, neg, latent, cfg=cfg))
        rep = last_run_report(stacked)
        assert rep.step_factors == [2, 2, 2, 1, 1, 1]
        assert rep.step_grid_tokens[0] * 4 >= rep.step_grid_tokens[3]
        assert rep.step_tokens == [-(-g // 2) for g in rep.step_grid_tokens]
        assert sorted(rep.planners) == ["Dynamic Patch Schedule", "test keep"]
    assert torch.equal(outs[0], outs[1])


def test_compose_order_and_merge_plans_fall_back_to_native(cases):
    from elastic_tokens import last_run_report
    from elastic_tokens.runtime.token_plan import NATIVE, MergePattern, StepInput, compose, ordered

    calls = []

    def planner(idea, change):
        class P:
            label = idea

            def start(self, binding, options, steps):
                class R:
                    idle = False
                    needs_latent = False

                    def plan(self, step, plan):
                        calls.append(idea)
                        return change(plan)
                return R()
        P.idea = idea
        return P()

    pair = MergePattern(torch.arange(6) // 2, 3)
    stack = [planner("merge", lambda p: p.replace(merge=pair)), planner("drop", lambda p: p.replace(keep=torch.arange(6))),
             planner("patch", lambda p: p.replace(factor=2))]
    runs = [p.start(None, {}, 1) for p in ordered(stack)]
    plan = compose(runs, StepInput(0, 1, 1.0, None, (1, 16, 8, 8), {}, lambda: None))
    assert calls == ["patch", "drop", "merge"]
    assert plan.factor == 2 and plan.tokens(16) == 3 and NATIVE.is_native and not plan.is_native
    with pytest.raises(ValueError, match="unknown idea"):
        ordered([planner("blur", lambda p: p)])

    model, (pos, neg), latent, cfg = cases["wan"]
    base = ksample(model, pos, neg, latent, cfg=cfg)
    merged = with_planner(model, planner("merge", lambda p: p.replace(merge=pair)))
    assert torch.equal(ksample(merged, pos, neg, latent, cfg=cfg), base)
    # a pattern made for another grid (6 tokens) runs native, counted (6 steps, cond+uncond batched);
    # merge plans that fit are executed (tests/test_token_merge.py)
    assert last_run_report(merged).fallbacks["merge pattern of another grid"] == 6


def test_token_kernels_round_trip():
    from elastic_tokens.kernels import token_select as ts

    x = torch.randn(2, 10, 4)
    idx = torch.tensor([7, 2, 5])
    part = ts.gather(x, idx)
    assert torch.equal(part, x[:, [7, 2, 5]])
    assert torch.equal(ts.scatter(x, idx, part), x)
    assert torch.equal(ts.with_extra(torch.tensor([1, 0]), 3, 5, 7), torch.tensor([0, 1, 2, 4, 3, 5, 6]))
    groups = torch.tensor([0, 0, 1, 2, 2, 2, 1, 3, 3, 0])
    field = torch.randn(2, 4, 4)
    assert torch.allclose(ts.merge(ts.unmerge(field, groups), groups, 4), field, atol=1e-6)
    assert torch.equal(ts.group_sizes(groups, 4), torch.tensor([3, 2, 3, 2]))


def test_the_log_line_reads_back_through_the_runtimes_own_parser(pack):
    from elastic_tokens.runtime.report import RunReport, parse_summary

    rep = RunReport(4, ["Dynamic Patch Schedule", "test keep"], [1, 2, 2, 1], [64, 8, 8, 32], [64, 16, 16, 64],
                    flops_native=4.0, flops_used=2.0, seconds=1.5)
    parsed = parse_summary(rep.summary())
    assert parsed == {"nodes": "Dynamic Patch Schedule + test keep", "steps": "4/4", "parts": "2 at p, 2 at 2p, 0 at 4p",
                      "flops_skipped_pct": 50.0, "estimated_speedup": 2.0, "tokens_skipped_pct": 30.0,
                      "sampling_s": 1.5}
