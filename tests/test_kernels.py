"""Kernel math: patchify round trips, resize properties, the criterion, the flow correction.

These import only torch and the pack's ``kernels`` (no ComfyUI), which is itself a property
worth keeping: the test would fail if a kernel started importing ComfyUI.
"""

import math

import pytest
import torch
from comfy_runtime import load_pack

load_pack()  # the repo as package ``elastic_tokens``; imports no ComfyUI

from elastic_tokens.kernels import criterion, flow, patchify, resize  # noqa: E402


def test_kernels_do_not_import_comfyui():
    for mod in (criterion, flow, patchify, resize):
        source = open(mod.__file__).read()
        assert "import comfy" not in source and "from comfy" not in source, mod.__name__


@pytest.mark.parametrize("patch", [2, 4, 8])
def test_patchify_round_trip_image(patch):
    x = torch.randn(2, 16, 32, 48)
    tokens, grid = patchify.patchify(x, patch)
    assert tokens.shape == (2, (32 // patch) * (48 // patch), 16 * patch * patch)
    assert grid == (32 // patch, 48 // patch)
    assert torch.equal(patchify.unpatchify(tokens, grid, patch), x)


@pytest.mark.parametrize("patch", [(1, 2, 2), (1, 4, 4), (1, 8, 8), (2, 4, 4)])
def test_patchify_round_trip_video(patch):
    x = torch.randn(1, 16, 4, 16, 24)
    tokens, grid = patchify.patchify(x, patch)
    assert tokens.shape[1] == math.prod(grid) and tokens.shape[2] == 16 * math.prod(patch)
    assert torch.equal(patchify.unpatchify(tokens, grid, patch), x)


def test_patchify_matches_comfyui_flux_layout():
    # Flux: "b c (h ph) (w pw) -> b (h w) (c ph pw)": token 0 holds channel-major 2x2 cell
    x = torch.arange(1 * 2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    tokens, _ = patchify.patchify(x, 2)
    assert tokens[0, 0].tolist() == [0, 1, 4, 5, 16, 17, 20, 21]


def test_patchify_rejects_indivisible():
    with pytest.raises(ValueError, match="not divisible"):
        patchify.patchify(torch.randn(1, 4, 6, 6), 4)
    with pytest.raises(ValueError, match="4-d image or 5-d video"):
        patchify.patchify(torch.randn(4, 6, 6), 2)


def test_pad_to_multiple_replicates_and_reports_size():
    x = torch.randn(1, 3, 2, 5, 6)
    padded, hw = patchify.pad_to_multiple(x, 4)
    assert padded.shape == (1, 3, 2, 8, 8) and hw == (5, 6)
    assert torch.equal(padded[..., :5, :6], x)
    assert torch.equal(padded[..., 7, :6], x[..., 4, :])


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "area"])
def test_resize_matrix_matches_interpolate(mode):
    s = torch.randn(1, 1, 3, 5, dtype=torch.float64)
    m = resize.resize_matrix((3, 5), (6, 10), mode)
    want = torch.nn.functional.interpolate(s, size=(6, 10), mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))
    assert torch.allclose((m @ s.flatten()).reshape(6, 10), want[0, 0])


def test_pi_resize_preserves_tokens_of_upsampled_patches():
    # FlexiViT's defining property: <B x, w'> == <x, w> for every small patch x
    torch.manual_seed(0)
    w = torch.randn(8, 16 * 2 * 2, dtype=torch.float64)
    w_big = resize.pi_resize_embed(w, channels=16, old_patch=2, new_patch=4)
    assert w_big.shape == (8, 16 * 4 * 4)
    x = torch.randn(5, 16, 2, 2, dtype=torch.float64)
    x_big = torch.nn.functional.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False)
    assert torch.allclose(x_big.reshape(5, -1) @ w_big.T, x.reshape(5, -1) @ w.T, atol=1e-9)


@pytest.mark.parametrize("down,resize_mode", [("area", "nearest"), ("pinv-bilinear", "bilinear")])
def test_downsampled_latent_equals_pi_resized_embed(down, resize_mode):
    # the latent-side view: native embed on a downsampled latent == PI-resized embed on big patches
    # (area pooling is PI-resize with nearest upsampling, pinv-bilinear with bilinear)
    torch.manual_seed(0)
    w = torch.randn(8, 4 * 2 * 2, dtype=torch.float64)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    w_big = resize.pi_resize_embed(w, channels=4, old_patch=2, new_patch=4, mode=resize_mode)
    big_tokens, _ = patchify.patchify(x, 4)
    small_tokens, _ = patchify.patchify(resize.downsample(x, 2, patch=2, mode=down), 2)
    assert torch.allclose(big_tokens @ w_big.T, small_tokens @ w.T, atol=1e-9)


@pytest.mark.parametrize("mode", ["area", "pinv-bilinear"])
@pytest.mark.parametrize("factor", [2, 4])
def test_downsample_keeps_constants_and_shrinks_noise_by_gain(mode, factor):
    const = torch.full((1, 2, 3, 16, 16), 0.7)
    assert torch.allclose(resize.downsample(const, factor, 2, mode), torch.full((1, 2, 3, 16 // factor, 16 // factor), 0.7), atol=1e-6)
    torch.manual_seed(0)
    noise = torch.randn(4, 16, 64, 64, dtype=torch.float64)
    std = resize.downsample(noise, factor, 2, mode).std().item()
    assert std == pytest.approx(resize.noise_gain(factor, 2, mode), rel=0.03)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_upsample_then_area_downsample_is_identity_for_nearest_and_smooth(mode):
    y = torch.randn(1, 4, 2, 8, 8)
    up = resize.upsample(y, 2, mode)
    assert up.shape == (1, 4, 2, 16, 16)
    if mode == "nearest":
        assert torch.allclose(resize.downsample(up, 2, 2, "area"), y)
    smooth = torch.ones(1, 1, 8, 8)
    assert torch.allclose(resize.upsample(smooth, 4, mode), torch.ones(1, 1, 32, 32))


def test_resize_rejects_unknown_modes():
    with pytest.raises(ValueError, match="unknown downsample mode"):
        resize.downsample(torch.randn(1, 1, 4, 4), 2, 2, "cubic")
    with pytest.raises(ValueError, match="unknown upsample mode"):
        resize.upsample(torch.randn(1, 1, 4, 4), 2, "cubic")


def _trajectory(field_fn, sigmas):
    return [field_fn(s) for s in sigmas]


def test_third_difference_vanishes_on_quadratic_and_score_is_step_size_invariant():
    base = torch.randn(1, 4, 8, 8)
    quad = lambda s: base * (s * s)  # noqa: E731 - second-degree in sigma: third difference is 0
    sig = [1.0, 0.8, 0.6, 0.4]
    assert criterion.third_difference(_trajectory(quad, sig), sig).abs().max() < 1e-5
    field = _smooth_field(seed=3) + 0.3 * torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(4))
    cubic = lambda s: field * s ** 3  # noqa: E731
    big, small = [1.0, 0.8, 0.6, 0.4], [1.0, 0.9, 0.8, 0.7]
    d_big = criterion.third_difference(_trajectory(cubic, big), big)
    d_small = criterion.third_difference(_trajectory(cubic, small), small)
    # sigma-normalised differences scale with the step squared (raw ones with its cube) ...
    assert (d_big.abs().mean() / d_small.abs().mean()).item() == pytest.approx(4.0, rel=1e-3)
    # ... and the detail score, normalised by the field's RMS, does not depend on it at all
    assert criterion.detail_score(d_big, 4, 0.4) == pytest.approx(criterion.detail_score(d_small, 4, 0.4), rel=1e-4)


def test_third_difference_input_errors():
    z = [torch.zeros(1, 1, 4, 4)] * 3
    with pytest.raises(ValueError, match="4 consecutive latents"):
        criterion.third_difference(z)
    with pytest.raises(ValueError, match="distinct"):
        criterion.third_difference(z + [z[0]], [1.0, 1.0, 0.5, 0.2])


def _smooth_field(h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(1, 4, h // 8, w // 8, generator=g)
    return torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)


def test_detail_score_low_for_smooth_high_for_white_noise():
    smooth = _smooth_field()
    noise = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    assert criterion.detail_score(smooth, 4, 0.4) < 0.3
    assert criterion.detail_score(noise, 4, 0.4) > 0.8
    # bigger blocks see more of the variation
    assert criterion.detail_score(smooth, 8, 0.4) > criterion.detail_score(smooth, 4, 0.4)
    # scale invariance: tau does not depend on the latent's scale
    assert criterion.detail_score(smooth * 1000, 4, 0.4) == pytest.approx(criterion.detail_score(smooth, 4, 0.4), rel=1e-5)


def test_choose_factor_follows_tau_and_video_frames():
    smooth = _smooth_field()
    factor, scores = criterion.choose_factor(smooth, 2, (2, 4), tau=0.5, rho=0.4)
    assert factor == 4 and set(scores) == {2, 4}
    assert criterion.choose_factor(smooth, 2, (2, 4), tau=0.0, rho=0.4)[0] == 1
    s2, s4 = scores[2], scores[4]
    assert criterion.choose_factor(smooth, 2, (2, 4), tau=(s2 + s4) / 2, rho=0.4)[0] == 2
    noise = torch.randn(1, 4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert criterion.choose_factor(noise, 2, (2, 4), tau=0.5, rho=0.4)[0] == 1
    with pytest.raises(ValueError, match="rho"):
        criterion.detail_score(smooth, 4, 40)


def test_flow_correction_recovers_a_smooth_clean_latent():
    # x = (1-s) x0 + s eps with a smooth x0; an oracle coarse model that knows x0 must give back
    # (up to the smoothness of x0) the full-size velocity eps - x0.
    torch.manual_seed(0)
    x0 = _smooth_field(64, 64)[:, :4]
    eps = torch.randn_like(x0)
    sigma = torch.tensor([0.7])
    x = (1 - sigma) * x0 + sigma * eps
    gain = resize.noise_gain(2)
    small = flow.rescale_to_flow(resize.downsample(x, 2), sigma, gain, channels=4)
    s_small = flow.coarse_sigma(sigma, gain)
    x0_small = resize.downsample(x0, 2)
    eps_small = (small - (1 - s_small) * x0_small) / s_small
    assert eps_small.std().item() == pytest.approx(1.0, rel=0.05)  # rescaled pooled noise is unit
    v_small = eps_small - x0_small  # what a perfect model predicts at s'
    x0_back = resize.upsample(flow.clean_estimate(small, v_small, s_small), 2)
    v = flow.full_velocity(x, x0_back, sigma)
    assert ((v - (eps - x0)).pow(2).mean() / (eps - x0).pow(2).mean()).item() < 0.01


def test_rescale_leaves_conditioning_channels_alone():
    x = torch.ones(2, 20, 4, 4)
    out = flow.rescale_to_flow(x, torch.tensor([0.5, 0.5]), 0.5, channels=16)
    assert torch.allclose(out[:, :16], torch.full_like(out[:, :16], 1 / 0.75))
    assert torch.equal(out[:, 16:], x[:, 16:])


def test_per_sample_selection_equals_one_selection_per_row():
    """A (B, K) index gathers, scatters (copy and in place) and extends each row as its own 1-d
    index would; a batch-1 tensor (shared positions) is expanded; a 2-row index serves a 4-row
    batch (cond + uncond of the same samples) and refuses a 3-row one."""
    from elastic_tokens.kernels.token_select import gather, rows_for, scatter, scatter_, with_extra

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 4, generator=gen)  # (B, heads, tokens, dim): tokens on dim 2
    index = torch.tensor([[1, 4, 7], [0, 2, 9]])
    got = gather(x, index, 2)
    assert torch.equal(got, torch.stack([x[i].index_select(1, index[i]) for i in range(2)]))
    shared = x[:1]
    assert torch.equal(gather(shared, index, 2)[1], shared[0].index_select(1, index[1]))
    part = torch.randn(2, 3, 3, 4, generator=gen)
    want = torch.stack([x[i].index_copy(1, index[i], part[i]) for i in range(2)])
    assert torch.equal(scatter(x, index, part, 2), want)
    buf = torch.zeros(2, 3, 12, 4)
    buf[:, :, 1:11] = x
    scatter_(buf.narrow(2, 1, 10), index, part, 2)
    assert torch.equal(buf[:, :, 1:11], want) and not buf[:, :, 0].any()
    ext = with_extra(index, 2, 12, 14)
    assert ext.tolist() == [[0, 1, 3, 6, 9, 12, 13], [0, 1, 2, 4, 11, 12, 13]]
    assert torch.equal(with_extra(index[0], 2, 12, 14), ext[0])
    assert torch.equal(rows_for(index, 4), torch.cat([index, index])) and rows_for(index, 3) is None
    assert torch.equal(rows_for(index[0], 3), index[0])
