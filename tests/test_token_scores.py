"""Token scores and selection for the Elastic Token Router (kernels/token_scores.py).

Pure torch, no ComfyUI: what each scorer ranks high, the starvation term, the elastic ordering
(a lower budget's kept set is a subset of a higher one's, ties broken by index) and the
nearest-computed-token map that the ``nearest`` fill-back copies from.
"""

import torch
from comfy_runtime import load_pack

load_pack()  # the repo as package ``elastic_tokens``; imports no ComfyUI

from elastic_tokens.kernels import token_scores as ts  # noqa: E402


def test_kernel_imports_no_comfyui():
    source = open(ts.__file__).read()
    assert "import comfy" not in source and "from comfy" not in source


def test_token_values_follow_the_models_token_order_and_pad_like_the_model():
    # token (row 0, col 1) of a 4x6 latent at patch 2 holds cells [0:2, 2:4]
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)
    tok = ts.token_values(x, 2)
    assert tok.shape == (1, 6, 8)
    assert torch.equal(tok[0, 1], x[0, :, 0:2, 2:4].reshape(-1))
    # 5x5 pads to 6x6 (3x3 tokens) by replicating the border, as the models pad
    assert ts.token_values(torch.randn(1, 3, 5, 5), 2).shape == (1, 9, 12)
    assert ts.token_values(torch.randn(2, 3, 3, 5, 5), 2).shape == (2, 27, 12)


def test_update_scores_rank_the_moving_region_first():
    prev = torch.zeros(1, 4, 8, 8)
    cur = prev.clone()
    cur[..., 4:6, 2:4] = torch.randn(4, 2, 2)  # one token (row 2, col 1) of a 4x4 grid moved
    scores = ts.update_scores(prev, cur, 2)
    assert scores.shape == (1, 16)
    assert int(scores[0].argmax()) == 2 * 4 + 1 and float(scores[0].sum() - scores[0, 9]) == 0.0


def test_context_scores_are_zero_on_flat_and_linear_fields_and_high_on_detail():
    flat = torch.full((1, 2, 8, 8), 3.0)
    assert float(ts.context_scores(flat, 2).abs().max()) < 1e-6
    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 2, 8, 8)
    inner = ts.context_scores(ramp, 2).view(4, 4)[1:3, 1:3]  # a linear field is predicted exactly inside
    assert float(inner.abs().max()) < 1e-5
    detail = flat.clone()
    detail[..., 0:2, 6:8] += torch.tensor([[1.0, -1.0], [-1.0, 1.0]])  # checkerboard in token (0, 3)
    assert int(ts.context_scores(detail, 2)[0].argmax()) == 3
    video = torch.zeros(1, 2, 3, 8, 8)
    video[:, :, 1, 4, 4] = 5.0
    scores = ts.context_scores(video, 2).view(3, 4, 4)
    assert scores[0].abs().max() == 0 and scores[1, 2, 2] == scores.max()


def test_change_scores_see_a_turning_trajectory_not_a_straight_one():
    z0 = torch.zeros(1, 1, 4, 4)
    straight = [z0, z0 + 1.0, z0 + 2.0]
    assert float(ts.change_scores(straight, [1.0, 0.5, 0.0], 2).max()) < 1e-6
    turning = [z0, z0 + 1.0, z0 + 2.0]
    turning[2] = turning[2].clone()
    turning[2][..., 2:4, 0:2] += 1.0
    scores = ts.change_scores(turning, [1.0, 0.5, 0.0], 2)
    assert int(scores[0].argmax()) == 2 and float(scores[0, 0]) < 1e-6


def test_x0_estimate_is_exact_for_an_euler_step_of_rectified_flow():
    x0, noise = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    z = lambda s: (1 - s) * x0 + s * noise  # noqa: E731
    assert torch.allclose(ts.x0_estimate(z(0.8), z(0.6), 0.8, 0.6), x0, atol=1e-5)


def test_starvation_lifts_a_long_skipped_token_above_a_busier_one():
    scores = torch.tensor([1.0, 0.5])
    assert ts.select(scores, 1).tolist() == [0]
    lifted = ts.starved(scores, torch.tensor([0, 8]))
    assert torch.allclose(lifted[1], torch.tensor(0.5 * 2.718281828 ** 0.8))
    assert ts.select(lifted, 1).tolist() == [1]


def test_selection_is_elastic_and_ties_go_to_the_lower_index():
    torch.manual_seed(0)
    scores = torch.randint(0, 4, (300,)).float()  # many ties
    order = ts.rank(scores)
    previous = set()
    for k in range(1, 301, 7):
        kept = ts.select(scores, k, order)
        assert kept.tolist() == sorted(kept.tolist()) and len(kept) == k
        assert previous <= set(kept.tolist())
        previous = set(kept.tolist())
    # among equal scores the lower index is kept first
    assert ts.select(torch.zeros(5), 2).tolist() == [0, 1]
    assert ts.select(torch.tensor([0.0, float("nan"), 1.0]), 1).tolist() == [1]
    assert ts.budget_tokens(0.5, 9) == 4 and ts.budget_tokens(0.01, 9) == 1 and ts.budget_tokens(1.0, 9) == 9


def test_nearest_source_copies_from_the_nearest_kept_token():
    keep = torch.tensor([0, 15])  # corners of a 4x4 grid
    src = ts.nearest_source(keep, (1, 4, 4)).view(4, 4)
    assert src[0, 0] == 0 and src[3, 3] == 15
    assert src[0, 1] == 0 and src[1, 0] == 0 and src[3, 2] == 15 and src[2, 3] == 15
    assert set(src.flatten().tolist()) == {0, 15}
    # kept tokens map to themselves; a frame without any kept token copies the nearest frame
    keep = torch.tensor([1, 2, 21])
    src = ts.nearest_source(keep, (3, 3, 3))
    assert src[keep].tolist() == keep.tolist()
    assert set(src[:9].tolist()) <= {1, 2} and set(src[18:].tolist()) == {21}
    assert set(src[9:18].tolist()) <= {1, 2, 21}
