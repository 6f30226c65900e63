"""The Dynamic Patch Schedule node sampling tiny Flux and Wan models through ComfyUI's KSampler.

Models are ComfyUI's own Flux / WanModel classes with random weights loaded by the real
UNETLoader code path (tests/support/tiny_models.py); sampling goes through the real
``nodes.common_ksampler``. Speed is not asserted here (no GPU in CI): see BENCHMARKS.md.
"""

import copy

import pytest
import torch

import tiny_models



def ksample(model, positive, negative, latent, steps=8, cfg=1.0, sampler="euler", seed=7):
    import nodes

    (out,) = nodes.common_ksampler(model, seed, steps, cfg, sampler, "simple", positive, negative, latent)
    return out["samples"]


def schedule(pack, model, **settings):
    from elastic_tokens.ideas.patch import apply_patch_schedule
    from elastic_tokens.ideas.patch.config import PatchScheduleConfig

    return apply_patch_schedule(model, PatchScheduleConfig(**settings))


def report(model):
    from elastic_tokens import last_run_report

    return last_run_report(model)


@pytest.fixture
def flux_inputs():
    pos, neg = tiny_models.flux_conditioning()
    return pos, neg, tiny_models.flux_latent(64, 64)


@pytest.fixture
def wan_inputs():
    pos, neg = tiny_models.wan_conditioning()
    return pos, neg, tiny_models.wan_latent(64, 64, 9)


def _options_snapshot(model):
    opts = model.model_options
    return repr(sorted(opts.keys())), repr(opts.get("transformer_options", {}).get("wrappers")), set(opts.get("transformer_options", {}))


def test_tau_zero_is_identical_to_the_plain_model_and_input_untouched(pack, tiny_flux, tiny_wan, flux_inputs, wan_inputs):
    for model, (pos, neg, latent), cfg in ((tiny_flux, flux_inputs, 1.0), (tiny_wan, wan_inputs, 5.0)):
        before = _options_snapshot(model)
        base = ksample(model, pos, neg, latent, cfg=cfg)
        patched = schedule(pack, model, tau=0.0)
        assert patched is not model
        out = ksample(patched, pos, neg, latent, cfg=cfg)
        assert torch.equal(out, base)
        assert report(patched).step_factors == [1] * 8
        assert _options_snapshot(model) == before  # the MODEL passed in was not changed


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_forced_schedule_is_followed_step_by_step(pack, family, tiny_flux, tiny_wan, flux_inputs, wan_inputs):
    model, (pos, neg, latent), cfg = (tiny_flux, flux_inputs, 1.0) if family == "flux" else (tiny_wan, wan_inputs, 5.0)
    base = ksample(model, pos, neg, latent, cfg=cfg)
    patched = schedule(pack, model, forced_schedule="4x2, 2x3, 1x3")
    out = ksample(patched, pos, neg, latent, cfg=cfg)
    rep = report(patched)
    assert rep.step_factors == [4, 4, 2, 2, 2, 1, 1, 1]
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert not torch.equal(out, base)
    # token FLOPs: 2 steps at 1/16, 3 at 1/4 of the image tokens; the log's estimate must reflect it
    from elastic_tokens.families import binding_for

    binding = binding_for(model)
    frames = latent["samples"].shape[2] if family == "wan" else 1
    native = frames * (latent["samples"].shape[-1] // 2) ** 2
    flops = lambda tokens: binding.step_flops(tokens, 8)  # noqa: E731 - 8 text tokens
    expected = 1 - (2 * flops(native // 16) + 3 * flops(native // 4) + 3 * flops(native)) / (8 * flops(native))
    assert rep.saved_fraction == pytest.approx(expected, rel=1e-6)
    assert rep.estimated_speedup == pytest.approx(1 / (1 - expected), rel=1e-6)
    assert "2 at 4p" in rep.summary() and "3 at 2p" in rep.summary()
    # deterministic: the same seed gives the same result
    assert torch.equal(ksample(patched, pos, neg, latent, cfg=cfg), out)


def test_cfg_and_batch_share_one_decision_per_step(pack, tiny_wan):
    pos, neg = tiny_models.wan_conditioning(batch=1)
    latent = tiny_models.wan_latent(64, 64, 9, batch=2)
    patched = schedule(pack, tiny_wan, forced_schedule="2x4")
    out = ksample(patched, pos, neg, latent, cfg=5.0)
    rep = report(patched)
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    assert rep.step_factors == [2, 2, 2, 2, 1, 1, 1, 1]
    # cond and uncond were evaluated once per step, both at that step's factor
    assert rep.calls[2] == 4 and rep.calls[1] == 4


@pytest.mark.parametrize("sampler,calls_per_step", [("heun", 2), ("dpmpp_2s_ancestral", 2)])
def test_samplers_calling_the_model_twice_per_step(pack, tiny_flux, flux_inputs, sampler, calls_per_step):
    pos, neg, latent = flux_inputs
    patched = schedule(pack, tiny_flux, forced_schedule="2x3")
    out = ksample(patched, pos, neg, latent, steps=6, sampler=sampler)
    rep = report(patched)
    assert torch.isfinite(out).all()
    assert rep.step_factors == [2, 2, 2, 1, 1, 1]
    # every extra evaluation inside a step used that step's patch size
    assert rep.calls[2] >= 3 * calls_per_step - 1
    assert sum(rep.calls.values()) >= 6 * calls_per_step - 2


def test_dynamic_schedule_warms_up_decides_and_stops_at_end_percent(pack, tiny_flux, flux_inputs):
    pos, neg, latent = flux_inputs
    patched = schedule(pack, tiny_flux, tau=1.0, rho=0.4, warmup_steps=3, end_percent=0.75)
    ksample(patched, pos, neg, latent, steps=12)
    rep = report(patched)
    assert rep.step_factors[:3] == [1, 1, 1]          # warm-up: the criterion needs 4 latents
    assert rep.step_factors[9:] == [1, 1, 1]          # past end_percent: native
    assert all(k in (2, 4) for k in rep.step_factors[3:9])  # tau = 1: every scored step goes coarse
    assert all(rep.step_scores[i] for i in range(3, 9)) and not any(rep.step_scores[i] for i in range(3))
    strict = schedule(pack, tiny_flux, tau=1e-6)
    ksample(strict, pos, neg, latent, steps=12)
    assert report(strict).step_factors == [1] * 12   # a tiny tau keeps everything native


def test_latent_not_divisible_by_the_coarse_patch_is_padded(pack, tiny_flux):
    pos, neg = tiny_models.flux_conditioning()
    latent = {"samples": torch.zeros(1, 16, 10, 14)}  # 80x112 px: not a multiple of 4p = 8 cells
    patched = schedule(pack, tiny_flux, forced_schedule="4x4")
    out = ksample(patched, pos, neg, latent)
    assert out.shape == (1, 16, 10, 14) and torch.isfinite(out).all()
    assert report(patched).step_factors[:4] == [4, 4, 4, 4]


def test_coarse_rope_positions_sit_at_the_centres_of_the_native_tokens(pack, tiny_flux):
    from elastic_tokens.families import binding_for

    binding = binding_for(tiny_flux)
    flux = tiny_flux.model.diffusion_model
    x = torch.zeros(1, 16, 16, 16)
    _, native_ids = flux.process_img(x)
    small = torch.zeros(1, 16, 8, 8)
    opts = {"rope_options": binding.coarse_rope_options(None, 2)}
    _, coarse_ids = flux.process_img(small, transformer_options=opts)
    native = native_ids[0].reshape(8, 8, 3)
    coarse = coarse_ids[0].reshape(4, 4, 3)
    centres = native.reshape(4, 2, 4, 2, 3).mean(dim=(1, 3))
    assert torch.allclose(coarse, centres)
    # composes with an upstream RoPE scaling (e.g. a "scale rope" node): still the centres
    up = {"scale_x": 2.0, "scale_y": 2.0, "shift_x": 1.0, "shift_y": 1.0}
    _, native_ids = flux.process_img(x, transformer_options={"rope_options": up})
    _, coarse_ids = flux.process_img(small, transformer_options={"rope_options": binding.coarse_rope_options(up, 2)})
    centres = native_ids[0].reshape(4, 2, 4, 2, 3).mean(dim=(1, 3))
    assert torch.allclose(coarse_ids[0].reshape(4, 4, 3), centres)


def test_stacks_with_easycache_in_either_order(pack, comfy, tiny_flux, flux_inputs):
    from comfy_extras.nodes_easycache import EasyCacheNode

    pos, neg, latent = flux_inputs

    def easycache(model):
        return EasyCacheNode.execute(model, reuse_threshold=3.0, start_percent=0.0, end_percent=1.0, verbose=False).result[0]

    for build in (lambda m: schedule(pack, easycache(m), forced_schedule="2x8"),
                  lambda m: easycache(schedule(pack, m, forced_schedule="2x8"))):
        model = build(tiny_flux)
        out = ksample(model, pos, neg, latent, steps=8)
        rep = report(model)
        assert torch.isfinite(out).all() and out.shape == latent["samples"].shape
        assert rep.step_factors[0] == 2
        # EasyCache skipped some transformer calls and ours ran the rest coarse. Had our wrapper
        # been outside EasyCache's (second order, without our move to innermost), all 8 calls
        # would have reached it.
        assert 0 < rep.calls[2] < 8


def test_two_patch_schedules_stack_into_one_plan_per_step_without_double_wrapping(pack, tiny_flux, flux_inputs):
    # Defined in ideas/patch/planner.py: each step runs at the larger patch the two nodes ask for,
    # whatever their order; the wrappers are added once.
    import comfy.patcher_extension as pe

    pos, neg, latent = flux_inputs
    for first, second in (("2x2", "1x5,4x1"), ("1x5,4x1", "2x2")):
        twice = schedule(pack, schedule(pack, tiny_flux, forced_schedule=first), forced_schedule=second)
        wrappers = twice.wrappers[pe.WrappersMP.DIFFUSION_MODEL]
        assert len(wrappers["elastic_tokens.runtime"]) == 1
        ksample(twice, pos, neg, latent)
        assert report(twice).step_factors == [2, 2, 1, 1, 1, 4, 1, 1]
        assert report(twice).planners == ["Dynamic Patch Schedule", "Dynamic Patch Schedule"]


def test_controlnet_style_spatial_inputs_fall_back_to_native(pack, tiny_flux, tiny_wan):
    from elastic_tokens.runtime.execute import spatial_blocker
    import inspect

    flux_sig = inspect.signature(tiny_flux.model.diffusion_model._forward)
    x = torch.zeros(1, 16, 8, 8)
    plain = flux_sig.bind(x, torch.zeros(1), torch.zeros(1, 4, 32), None, None, None, None, {})
    assert spatial_blocker(plain) is None
    control = flux_sig.bind(x, torch.zeros(1), torch.zeros(1, 4, 32), None, None, None, {"input": [torch.zeros(1)]}, {})
    assert spatial_blocker(control) == "ControlNet"
    wan_sig = inspect.signature(tiny_wan.model.diffusion_model._forward)
    v = torch.zeros(1, 16, 3, 8, 8)
    concat = wan_sig.bind(v, torch.zeros(1), torch.zeros(1, 4, 32), None, torch.zeros(1, 16, 1, 8, 8), {})
    assert spatial_blocker(concat) == "spatial input 'time_dim_concat'"


def test_clear_errors_for_bad_settings_and_unsupported_models(pack, comfy, tiny_flux):
    from elastic_tokens.families import UnsupportedModelError
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    with pytest.raises(ValueError, match="forced_schedule: cannot read '3'"):
        schedule(pack, tiny_flux, forced_schedule="2x4, 3")
    # an empty window (start >= end) is no error but "no effect", as ComfyUI's own start/end
    # settings treat it (tests/test_bad_input.py samples it); values outside [0, 1] still raise
    from elastic_tokens.runtime.sampling_hooks import planners_of

    (empty,) = planners_of(schedule(pack, tiny_flux, start_percent=0.8, end_percent=0.2))
    assert empty.config.never_coarse
    with pytest.raises(ValueError, match=r"end_percent must be in \[0, 1\]"):
        schedule(pack, tiny_flux, start_percent=0.2, end_percent=1.2)
    eps_model = ModelSamplingDiscrete().patch(tiny_flux, "eps", False)[0]
    with pytest.raises(UnsupportedModelError, match="flow-matching"):
        schedule(pack, eps_model)
    import comfy.model_patcher

    other = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(UnsupportedModelError, match="supports Flux-family .* and Wan"):
        schedule(pack, other)


def test_v3_node_schema_and_execute(pack, tiny_flux):
    from elastic_tokens.nodes.dynamic_patch_schedule import DynamicPatchSchedule

    schema = DynamicPatchSchedule.define_schema()
    inputs = {i.id: i for i in schema.inputs}
    assert list(inputs)[:3] == ["model", "tau", "rho"]
    assert all(i.tooltip for i in schema.inputs)
    assert inputs["tau"].min == 0.0 and inputs["tau"].max == 1.0 and inputs["tau"].display_mode == "slider"
    before = copy.copy(tiny_flux.model_options)
    out = DynamicPatchSchedule.execute(tiny_flux, tau=0.5, rho=0.4, warmup_steps=3, start_percent=0.0, end_percent=0.9,
                                       max_patch="2p", forced_schedule="", coarse_embed="pinv-bilinear",
                                       coarse_deembed="nearest", cuda_graphs=False).result[0]
    from elastic_tokens.runtime.sampling_hooks import planners_of

    (planner,) = planners_of(out)
    assert planner.config.max_patch == 2 and planner.config.coarse_embed == "pinv-bilinear"
    assert tiny_flux.model_options.keys() == before.keys()


def test_wan_image_to_video_runs_coarse_with_its_concatenated_image_channels(pack, comfy):
    # Wan 2.1 I2V feeds 36 channels: 16 noisy + mask and image latent (no noise). Coarse steps
    # pool all of them and correct the noise level of the first 16 only.
    import comfy.model_patcher
    import comfy.supported_models

    config = dict(image_model="wan2.1", model_type="i2v", patch_size=(1, 2, 2), text_len=512, in_dim=36, dim=128,
                  ffn_dim=256, freq_dim=256, text_dim=tiny_models.TEXT_DIM, out_dim=16, num_heads=1, num_layers=1,
                  window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)
    model_config = comfy.supported_models.WAN21_I2V(config)
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    torch.manual_seed(0)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.05)
    i2v = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
    pos, neg = tiny_models.wan_conditioning()
    image = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    for cond in (pos, neg):
        cond[0][1]["concat_latent_image"] = image
    latent = tiny_models.wan_latent(64, 64, 9)
    plain = ksample(i2v, pos, neg, latent, cfg=5.0)
    patched = schedule(pack, i2v, forced_schedule="2x4")
    out = ksample(patched, pos, neg, latent, cfg=5.0)
    rep = report(patched)
    assert rep.step_factors == [2, 2, 2, 2, 1, 1, 1, 1] and not rep.fallbacks
    assert out.shape == plain.shape and torch.isfinite(out).all() and not torch.equal(out, plain)


def test_weight_patches_such_as_loras_apply_at_coarse_steps(pack, tiny_flux, flux_inputs):
    # Coarse steps run the model's own (patched) embed layer: a LoRA-style weight patch on img_in
    # must change a run whose every step is coarse.
    pos, neg, latent = flux_inputs
    coarse = schedule(pack, tiny_flux, forced_schedule="2x8")
    plain_out = ksample(coarse, pos, neg, latent)
    lora = tiny_flux.clone()
    weight = tiny_flux.model.diffusion_model.img_in.weight
    lora.add_patches({"diffusion_model.img_in.weight": (torch.randn_like(weight) * 0.5,)}, 1.0)
    lora_coarse = schedule(pack, lora, forced_schedule="2x8")
    lora_out = ksample(lora_coarse, pos, neg, latent)
    assert report(lora_coarse).step_factors == [2] * 8
    assert not torch.allclose(lora_out, plain_out, atol=1e-4)
    # and the base model is unpatched again afterwards (ComfyUI restores weights after sampling)
    assert torch.equal(ksample(coarse, pos, neg, latent), plain_out)
