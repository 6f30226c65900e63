"""The detail proxy's data (benchmarks/proxy/detail_scenes.py) and trainer (train_detail_proxy.py), on CPU.

Scenes:
* a scene is a pure function of its seed: the same seeds render bit-identically twice, and a
  scene does not depend on the batch it is rendered in (so the held-out reference set is the same
  whatever --batch the benchmark uses); the integer hash every parameter comes from equals a plain
  Python reference implementation (exact on every device);
* the held-out reference stream is disjoint from the training stream (seed ranges, and what the
  trainer's generator actually draws), and scene i of it has class i % 10 like the benchmark's seed i;
* the detail map means what it says: only 0/1, textured pixels vary strongly from pixel to pixel and
  flat ones do not (a detail map drawn at random would fail both), and a scene mix has flat and
  textured tokens in useful shares.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

PROXY = Path(__file__).resolve().parents[1] / "benchmarks" / "proxy"
if str(PROXY) not in sys.path:
    sys.path.insert(0, str(PROXY))
import detail_scenes as ds  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core CPU
    yield
    torch.set_num_threads(threads)


def _py_hash32(x: int) -> int:
    m = 0xFFFFFFFF
    x &= m
    x = (((x >> 16) ^ x) * 0x45D9F3B) & m
    x = (((x >> 16) ^ x) * 0x45D9F3B) & m
    return (x >> 16) ^ x


def test_hash_is_exact_integer_arithmetic():
    xs = [0, 1, 2, 12345, 2**31 - 1, 2**32 + 7, ds.REF_SEED_BASE + 3, -5]
    got = ds.hash32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [_py_hash32(x) for x in xs]
    assert len(set(got)) == len(got)


def test_scenes_are_pure_functions_of_their_seed():
    seeds = [3, 17, ds.REF_SEED_BASE + 5]
    a_img, a_det = ds.render(seeds)
    b_img, b_det = ds.render(seeds)
    assert a_img.shape == (3, 1, 256, 256) and a_det.shape == (3, 1, 256, 256)
    assert torch.equal(a_img, b_img) and torch.equal(a_det, b_det)
    one_img, one_det = ds.render([17])  # same scene, other batch
    assert torch.allclose(one_img[0], a_img[1], atol=1e-5) and torch.equal(one_det[0], a_det[1])
    assert (a_img[0] - a_img[1]).abs().mean() > 0.05  # different seeds, different scenes
    assert a_img.min() >= -1 and a_img.max() <= 1


def test_reference_stream_is_held_out():
    ref = ds.reference_seeds(1000)
    assert ref.min() >= ds.TRAIN_SEEDS  # training seeds are [0, TRAIN_SEEDS)
    assert ds.class_of(ref).tolist() == [i % 10 for i in range(1000)]  # as the benchmark's seed i
    gen = torch.Generator().manual_seed(0)
    drawn = torch.cat([ds.train_seeds(gen, 4096) for _ in range(4)])
    assert drawn.min() >= 0 and drawn.max() < ds.TRAIN_SEEDS
    assert not set(drawn.tolist()) & set(ref.tolist())
    assert drawn.unique().numel() > 0.99 * drawn.numel()  # a stream, not a small pool
    # disjoint seeds give different scene parameters (the hash does not collapse the two ranges)
    ua, ub = ds.scene_uniforms(ref[:64]), ds.scene_uniforms(torch.arange(64))
    assert (ua[:, None, :8] - ub[None, :, :8]).abs().amax(-1).min() > 1e-3


def test_detail_map_marks_texture_and_only_texture():
    img, det = ds.render_many(torch.arange(12))
    assert set(det.unique().tolist()) <= {0.0, 1.0}
    g = (img[..., 1:, 1:] - img[..., :-1, 1:]).abs() + (img[..., 1:, 1:] - img[..., 1:, :-1]).abs()

    def changing(d):
        """Shares of pixels whose value changes by > 0.05 to a neighbour, inside the textured and
        inside the flat regions of map ``d`` (3x3 eroded, away from region borders)."""
        inner_tex = -torch.nn.functional.max_pool2d(-d, 3, 1, 1) > 0.5
        inner_flat = torch.nn.functional.max_pool2d(d, 3, 1, 1) < 0.5
        return (g[inner_tex] > 0.05).float().mean(), (g[inner_flat] > 0.05).float().mean()

    tex, flat = changing(det[..., 1:, 1:])
    assert tex > 0.6, tex      # textures change at the pixel scale (measured 0.80)
    assert flat < 0.05, flat   # gradients and flat shapes only at their outlines (measured 0.011)
    # another scene's detail map fails the same check (measured 0.41 / 0.30): the test has teeth
    tex_w, flat_w = changing(det[..., 1:, 1:].roll(1, dims=0))
    assert tex_w < 0.6 and flat_w > 0.05, (tex_w, flat_w)
    shares = ds.token_shares(det)
    assert 0.15 < shares["textured"] < 0.6 and 0.3 < shares["flat"] < 0.85, shares
    assert abs(sum(shares.values()) - 1) < 1e-6
    assert ds.token_detail(det).shape == (12, 32, 32)
    # textures put far more energy at periods below 8 px than a smooth image
    smooth = torch.nn.functional.interpolate(img, scale_factor=1 / 8, mode="area")
    smooth = torch.nn.functional.interpolate(smooth, size=(256, 256), mode="bilinear")
    assert ds.high_freq_share(img) > 0.05 > 5 * ds.high_freq_share(smooth)
