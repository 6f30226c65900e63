"""The Dynamic Patch Schedule node on later members of the two families, through the real KSampler.

Tiny random-weight models loaded by ComfyUI's own detection and loader (tests/support/tiny_models.py
``load_tiny_family``): Flux.2 (128-channel latent at /16, patch 1: a 2p step reads 2x2 latent cells),
Flux.2 with a reference image (``index`` and ``index_timestep_zero``: per-token modulation of the
reference tokens), Flux Kontext (the FLUX.1 class with a reference latent) and Wan 2.2 TI2V 5B
(48-channel latent at /16). Run on every ComfyUI version the test command runs (0.3.75, 0.33.0).
"""

import pytest
import torch

import node_runs
import tiny_models

SCHEDULE = "2x4, 1x4"  # 8 steps: 4 at 2p, then 4 native


def ksample(model, positive, negative, latent, cfg=1.0, steps=8):
    return node_runs.ksample(model, positive, negative, latent, steps=steps, cfg=cfg, seed=7)


def schedule(model, **settings):
    from elastic_tokens.ideas.patch import apply_patch_schedule
    from elastic_tokens.ideas.patch.config import PatchScheduleConfig

    return apply_patch_schedule(model, PatchScheduleConfig(**settings))


def report(model):
    from elastic_tokens import last_run_report

    return last_run_report(model)


@pytest.fixture(scope="module")
def flux2(comfy):
    return tiny_models.load_tiny_family("flux2")


@pytest.fixture(scope="module")
def wan22_5b(comfy):
    return tiny_models.load_tiny_family("wan22_5b")


def _flux2_cond(reference=None, method=None):
    pos, neg = tiny_models.flux_conditioning()
    extra = {"guidance": 3.5, "pooled_output": pos[0][1]["pooled_output"]}  # 0.3.75's Flux2 reads it (unused)
    if reference is not None:
        extra.update(reference_latents=[reference], reference_latents_method=method)
    return [[pos[0][0], dict(extra)]], [[neg[0][0], dict(extra)]]


def _case(name, flux2, wan22_5b, tiny_flux):
    """(model, positive, negative, latent, cfg, (native patch, latent channels))"""
    if name == "flux2":
        return (flux2, *_flux2_cond(), tiny_models.latent_for(flux2, 128, 128), 1.0, (1, 128))
    if name.startswith("flux2_edit"):
        ref = torch.randn(1, 128, 8, 8, generator=torch.Generator().manual_seed(5))
        method = "index_timestep_zero" if name.endswith("zero") else "index"
        return (flux2, *_flux2_cond(ref, method), tiny_models.latent_for(flux2, 128, 128), 1.0, (1, 128))
    if name == "kontext":
        pos, neg = tiny_models.flux_conditioning()
        ref = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(6))
        for c in (pos, neg):
            c[0][1]["reference_latents"] = [ref]
        return tiny_flux, pos, neg, tiny_models.flux_latent(64, 64), 1.0, (2, 16)
    assert name == "wan22_5b"
    pos, neg = tiny_models.wan_conditioning()
    return wan22_5b, pos, neg, tiny_models.latent_for(wan22_5b, 64, 64, length=9), 5.0, (2, 48)


@pytest.mark.parametrize("name", ["flux2", "flux2_edit", "flux2_edit_timestep_zero", "kontext", "wan22_5b"])
def test_forced_schedule_runs_coarse_steps_and_tau_zero_is_the_plain_model(name, pack, flux2, wan22_5b, tiny_flux,
                                                                           one_thread):
    from elastic_tokens.families import binding_for

    model, pos, neg, latent, cfg, (patch, channels) = _case(name, flux2, wan22_5b, tiny_flux)
    binding = binding_for(model)
    assert (binding.native_patch, binding.latent_channels) == (patch, channels)
    base = ksample(model, pos, neg, latent, cfg)

    plain = schedule(model, tau=0.0)
    assert torch.equal(ksample(plain, pos, neg, latent, cfg), base)

    patched = schedule(model, forced_schedule=SCHEDULE)
    out = ksample(patched, pos, neg, latent, cfg)
    rep = report(patched)
    assert rep.step_factors == [2] * 4 + [1] * 4
    assert not rep.fallbacks, rep.summary()  # reference tokens and per-token modulation need none
    assert rep.flops_used < rep.flops_native
    assert out.shape == base.shape and torch.isfinite(out).all() and not torch.equal(out, base)


def test_wan22_5b_with_a_masked_first_frame_runs_native_and_says_so(pack, wan22_5b, one_thread):
    """Wan 2.2 TI2V's image-to-video mode: the kept first frame makes per-token timesteps and a
    ``denoise_mask`` laid out on the latent grid; the coarse steps run native, counted in the log."""
    latent = tiny_models.latent_for(wan22_5b, 64, 64, length=9)
    latent["samples"] = torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(8))
    mask = torch.ones(1, 1, *latent["samples"].shape[2:])
    mask[:, :, 0] = 0.0  # the first latent frame is given, not sampled
    latent["noise_mask"] = mask
    pos, neg = tiny_models.wan_conditioning()
    patched = schedule(wan22_5b, forced_schedule=SCHEDULE)
    out = ksample(patched, pos, neg, latent, 5.0)
    rep = report(patched)
    assert rep.step_factors == [2] * 4 + [1] * 4  # steps found from the noisy tokens' timestep
    assert set(rep.fallbacks) == {"spatial input 'denoise_mask'"} and "ran native instead" in rep.summary()
    assert rep.flops_used == rep.flops_native and torch.isfinite(out).all()
