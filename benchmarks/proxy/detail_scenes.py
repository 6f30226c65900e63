#!/usr/bin/env python3
"""Procedural scenes with real detail at the token scale, and a per-pixel map of where it is.

Why: the Fashion-MNIST proxies are 28x28 images upsampled 4.6x (every token is a smooth
interpolation), so skipping or merging tokens costs almost nothing there. These scenes have both
things the seed papers' claim is about: FLAT regions (shapes at one gray level over a smooth
gradient) and DETAIL at the native token scale (textures of period 2-8 px inside an 8x8 px token
of the detail proxy), and, because they are drawn by a program, the detail map is known exactly,
so a router's or merger's choices can be checked against it.

A scene (256x256 grayscale, pure torch, batched, same code on CPU and CUDA)
-------------------------------------------------------------------------
* Background: a linear gradient between two gray levels at a random angle, smoothstepped.
* 3-5 large shapes (layout 0) or 6-10 smaller ones (layout 1), painted in order (later ones
  occlude earlier ones): rotated rectangles, rotated ellipses and convex polygons (3-6 sides),
  anti-aliased over 1 px (alpha = clamp(0.5 - signed distance)), each at a flat gray level.
* Each shape is TEXTURED with probability 0.7: its gray level +- half a contrast of 0.25-0.7 times
  a texture of period P ~ U(2, 8) px at a random angle: stripes (a clipped square wave),
  checker (the clipped product of two square waves), noise (blocky value noise of cell P/2 px)
  or grating (a sinusoid). The detail map is 1 where the visible shape (alpha > 0.5) is textured,
  0 elsewhere (flat shapes, background; anti-aliased edges of flat shapes count as flat).
* Grammar ``axis`` (``render(..., grammar="axis")``; the default is ``free``, everything above):
  the same scenes with every angle snapped to the pixel grid: rectangles and ellipses only (a
  polygon slot draws a rectangle), shape axes at 0 or 90 degrees, textures along x or y. Detail
  and flat regions as before, with outlines along the token grid: scenes a small model learns to
  draw within one device session, where the ``free`` grammar's proxy sampled blobs (BENCHMARKS.md,
  section 3). The committed detail proxy is trained on ``axis``.
* Class = seed % 10 (the proxy's conditioning): texture family = class % 5 (stripes, checker,
  noise, grating, mixed: each textured shape picks one), layout = class // 5.

Determinism: every random number of a scene is a counter-based integer hash of (seed, slot)
(a 32-bit xorshift-multiply hash computed in int64 with masks, so exact on every device), and
pixel noise is a hash of (seed, shape, cell). Scene ``s`` is therefore a pure function of ``s``
(bit-identical parameters on CPU and CUDA; pixels equal to float32 rounding), independent of the
batch it is rendered in. Streams: TRAINING seeds are [0, 10^9) (the trainer draws them from its
own generator); the held-out REFERENCE stream for FID is seeds 10^9 + i, i = 0, 1, ... (class
i % 10, as the benchmark's seed i), disjoint from every training seed by construction.

``python benchmarks/proxy/detail_scenes.py [--n 256] [--png out.png]`` prints the measurement the
proxy's card quotes: the share of spectral energy at periods below 8 px (mean removed; on the
Fashion-MNIST proxy's 128x128 images for comparison, when .proxy_data/ has them) and the share of
8x8 px tokens that are fully textured, fully flat, or mixed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SIZE = 256            # pixels a side
TOKEN_PX = 8          # pixels a side of one image token (pixel_unshuffle 4, then Flux patch 2)
K_MAX = 10            # shape slots per scene
N_CLASSES = 10
FAMILIES = ("stripes", "checker", "noise", "grating", "mixed")
GRAMMARS = ("free", "axis")           # free: any angle, polygons too; axis: snapped to the pixel grid
TRAIN_SEEDS = 1_000_000_000           # training scenes: seeds [0, TRAIN_SEEDS)
REF_SEED_BASE = 1_000_000_000         # held-out reference scene i = seed REF_SEED_BASE + i
P_TEXTURED = 0.7
PERIOD = (2.0, 8.0)

_M = 0xFFFFFFFF
_SLOTS_SCENE = 8      # scene-level slots, then _SLOTS_SHAPE per shape
_SLOTS_SHAPE = 24


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply, 0x45d9f3b) of int64 ``x``, in [0, 2^32), as int64.
    Products stay below 2^59, so int64 arithmetic is exact on every device."""
    x = x & _M
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M
    return (x >> 16) ^ x


def _key(a: torch.Tensor, b) -> torch.Tensor:
    return hash32(hash32(a) ^ ((b * 0x9E3779B9) & _M))


def _unit(h: torch.Tensor) -> torch.Tensor:
    """hash -> float32 uniform in [0, 1) (24 bits)."""
    return (h >> 8).to(torch.float32) / float(1 << 24)


def scene_uniforms(seeds: torch.Tensor) -> torch.Tensor:
    """(B,) int64 seeds -> (B, slots) uniforms in [0, 1), slot j = hash(seed, j)."""
    n = _SLOTS_SCENE + K_MAX * _SLOTS_SHAPE
    j = torch.arange(n, device=seeds.device, dtype=torch.int64)
    return _unit(_key(seeds[:, None], j[None, :]))


def class_of(seeds) -> torch.Tensor:
    return torch.as_tensor(seeds, dtype=torch.int64) % N_CLASSES


def _lerp(u, lo, hi):
    return lo + (hi - lo) * u


def check_grammar(grammar: str) -> str:
    if grammar not in GRAMMARS:
        raise ValueError(f"scene grammar {grammar!r}: expected one of {', '.join(GRAMMARS)}")
    return grammar


def _angle(u: torch.Tensor, axis: bool) -> torch.Tensor:
    """A shape's or texture's angle from its uniform ``u``: any angle in [0, pi), or (grammar
    ``axis``) 0 or pi/2."""
    return (u * 2).floor() * (math.pi / 2) if axis else u * math.pi


def _polygon_sd(th, dx, dy, r, u) -> torch.Tensor:
    """Signed distance (px, negative inside) of a shape slot's convex polygon: 3-6 sides (slot 6)
    at jittered angles from ``th`` (slots 7-12), each at 0.6-1.0 of the radius ``r`` (slots 13-15)."""
    n_sides = 3 + (u(6) * 4).floor()                       # 3..6
    sd = torch.full_like(dx, -1e9)
    for j in range(6):
        on = j < n_sides
        phi = th + (j + 0.35 * (u(7 + j) - 0.5)) * 2 * math.pi / n_sides
        d = r * _lerp(u(13 + j % 3), 0.6, 1.0)
        side = torch.cos(phi) * dx + torch.sin(phi) * dy - d
        sd = torch.where(on, torch.maximum(sd, side), sd)
    return sd


def render(seeds, device=None, grammar: str = "free") -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes of ``seeds`` -> (images (B, 1, 256, 256) float32 in [-1, 1], detail (B, 1, 256, 256)
    float32 in {0, 1}). Pure function of each seed and the grammar (see the module docstring)."""
    axis = check_grammar(grammar) == "axis"
    seeds = torch.as_tensor(seeds, dtype=torch.int64, device=device).reshape(-1)
    dev = seeds.device
    B = seeds.shape[0]
    U = scene_uniforms(seeds)                                  # (B, slots)
    cls = class_of(seeds)
    family = cls % 5                                           # 0..4 (4 = mixed)
    layout = cls // 5                                          # 0: few large, 1: many small
    c = torch.arange(SIZE, device=dev, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(c, c, indexing="ij")               # (H, W) pixel centres
    xx, yy = xx[None], yy[None]

    def s(j):                                                   # scene slot j as (B, 1, 1)
        return U[:, j].view(B, 1, 1)

    # background: smoothstepped linear gradient between two gray levels
    g0, g1 = _lerp(s(0), 0.1, 0.9), _lerp(s(1), 0.1, 0.9)
    ang = s(2) * 2 * math.pi
    proj = (torch.cos(ang) * (xx - SIZE / 2) + torch.sin(ang) * (yy - SIZE / 2)) / (SIZE * _lerp(s(3), 0.5, 1.2))
    t = (proj + 0.5).clamp(0, 1)
    img = g0 + (g1 - g0) * t * t * (3 - 2 * t)
    detail = torch.zeros_like(img)
    few = (layout == 0).view(B, 1, 1)
    n_shapes = torch.where(few, 3 + (s(4) * 3).floor(), 6 + (s(4) * 5).floor())  # 3..5 or 6..10

    for k in range(K_MAX):
        base = _SLOTS_SCENE + k * _SLOTS_SHAPE

        def u(j):
            return U[:, base + j].view(B, 1, 1)

        active = (k < n_shapes)
        kind = (u(0) * 3).floor()                              # 0 rect, 1 ellipse, 2 polygon
        cx, cy = _lerp(u(1), 0.1, 0.9) * SIZE, _lerp(u(2), 0.1, 0.9) * SIZE
        r = torch.where(few, _lerp(u(3), 0.22, 0.42), _lerp(u(3), 0.10, 0.24)) * SIZE  # half-size, px
        a, b = r, r * _lerp(u(4), 0.45, 1.0)
        th = _angle(u(5), axis)
        dx, dy = xx - cx, yy - cy
        px = torch.cos(th) * dx + torch.sin(th) * dy
        py = -torch.sin(th) * dx + torch.cos(th) * dy
        # signed distances (px, negative inside)
        qx, qy = px.abs() - a, py.abs() - b
        sd_rect = torch.hypot(qx.clamp_min(0), qy.clamp_min(0)) + torch.maximum(qx, qy).clamp_max(0)
        k0 = torch.hypot(px / a, py / b)
        k1 = torch.hypot(px / (a * a), py / (b * b)).clamp_min(1e-6)
        sd_ell = k0 * (k0 - 1) / k1
        if axis:  # no polygons: a polygon slot draws a rectangle, and its polygon is never computed
            sd = torch.where(kind == 1, sd_ell, sd_rect)
        else:
            sd = torch.where(kind == 0, sd_rect, torch.where(kind == 1, sd_ell, _polygon_sd(th, dx, dy, r, u)))
        alpha = (0.5 - sd).clamp(0, 1) * active

        # texture
        level = _lerp(u(16), 0.05, 0.95)
        textured = (u(17) < P_TEXTURED) & active
        fam = torch.where(family.view(B, 1, 1) == 4, (u(18) * 4).floor().long(), family.view(B, 1, 1))
        period = _lerp(u(19), *PERIOD)
        tang = _angle(u(20), axis)
        tu = torch.cos(tang) * xx + torch.sin(tang) * yy
        tv = -torch.sin(tang) * xx + torch.cos(tang) * yy
        w1 = torch.sin(2 * math.pi * tu / period)
        w2 = torch.sin(2 * math.pi * tv / period)
        cell = period / 2
        shape_key = _key(seeds.view(B, 1, 1), base + 23)
        ci = (tu / cell).floor().to(torch.int64)
        cj = (tv / cell).floor().to(torch.int64)
        noise = _unit(hash32(shape_key ^ ((ci * 73856093) & _M) ^ ((cj * 19349663) & _M))) * 2 - 1
        tex = torch.where(fam == 0, (3 * w1).clamp(-1, 1),
              torch.where(fam == 1, (9 * w1 * w2).clamp(-1, 1),
              torch.where(fam == 2, noise, w1)))
        contrast = _lerp(u(21), 0.25, 0.7)
        val = torch.where(textured, (level + 0.5 * contrast * tex).clamp(0, 1), level)
        img = img * (1 - alpha) + val * alpha
        detail = torch.where(alpha > 0.5, textured.float().expand_as(detail), detail)

    return (img * 2 - 1)[:, None], detail[:, None]


def train_seeds(gen: torch.Generator, n: int, device=None) -> torch.Tensor:
    """``n`` training seeds drawn from ``gen`` (uniform in [0, TRAIN_SEEDS))."""
    return torch.randint(TRAIN_SEEDS, (n,), generator=gen, device=device or gen.device, dtype=torch.int64)


def reference_seeds(n: int, start: int = 0) -> torch.Tensor:
    """Held-out reference scenes ``start .. start+n-1`` (scene i has class i % 10)."""
    return REF_SEED_BASE + torch.arange(start, start + n, dtype=torch.int64)


def render_many(seeds, device=None, chunk: int = 64, grammar: str = "free"):
    """``render`` in chunks (memory), concatenated on CPU."""
    seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1)
    imgs, dets = [], []
    for i in range(0, len(seeds), chunk):
        a, b = render(seeds[i:i + chunk].to(device), grammar=grammar)
        imgs.append(a.cpu())
        dets.append(b.cpu())
    return torch.cat(imgs), torch.cat(dets)


# --------------------------------------------------------------------------- measurements

def token_detail(detail: torch.Tensor, token_px: int = TOKEN_PX) -> torch.Tensor:
    """(B, 1, H, W) detail map -> (B, H/token_px, W/token_px) share of textured pixels per token."""
    return F.avg_pool2d(detail.float(), token_px)[:, 0]


def token_shares(detail: torch.Tensor, token_px: int = TOKEN_PX) -> dict:
    """Shares of tokens fully textured (every pixel), fully flat (none) and mixed."""
    t = token_detail(detail, token_px)
    tex = float((t >= 1.0).float().mean())
    flat = float((t <= 0.0).float().mean())
    return {"textured": tex, "flat": flat, "mixed": 1.0 - tex - flat}


def high_freq_share(images: torch.Tensor, period_px: float = 8.0) -> float:
    """Share of spectral energy (image mean removed) at periods below ``period_px`` pixels,
    i.e. radial frequency above 1/period_px cycles per pixel; pooled over the batch."""
    x = images.float()[:, 0]
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    p = torch.fft.fft2(x).abs() ** 2
    fy = torch.fft.fftfreq(x.shape[-2])[:, None]
    fx = torch.fft.fftfreq(x.shape[-1])[None, :]
    hi = torch.hypot(fy, fx) > 1.0 / period_px
    return float(p[:, hi].sum() / p.sum().clamp_min(1e-12))


def save_preview(seeds, path, with_detail: bool = True, grammar: str = "free") -> None:
    """A PNG: each scene (top) and its detail map (bottom, white = textured)."""
    from PIL import Image

    img, det = render_many(seeds, grammar=grammar)
    a = ((img[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    rows = [torch.cat(list(a), dim=1)]
    if with_detail:
        rows.append(torch.cat(list((det[:, 0] * 255).to(torch.uint8)), dim=1))
    Image.fromarray(torch.cat(rows, dim=0).numpy(), mode="L").save(path)


def _fashion_mnist_share(n: int):
    """The same spectral share on the image proxy's 128x128 Fashion-MNIST images, if installed."""
    import importlib.util
    from pathlib import Path

    here = Path(__file__).resolve().parent
    for d in (here.parents[1] / ".proxy_data", Path("/usr/share/datasets/fashion-mnist")):
        f = d / "train-images-idx3-ubyte.gz"
        if f.is_file():
            spec = importlib.util.spec_from_file_location("_tip", here / "train_image_proxy.py")
            tip = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(tip)
            u8 = torch.from_numpy(tip.read_idx(f)[:n].copy())
            x = F.interpolate(u8[:, None].float() / 127.5 - 1, size=(128, 128), mode="bilinear",
                              align_corners=False)
            return high_freq_share(x)
    return None


def main(argv=None) -> dict:
    import argparse
    import time

    ap = argparse.ArgumentParser(description="measure the detail scenes (training stream)")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--png", default=None, help="write a preview of the first 8 reference scenes")
    ap.add_argument("--grammar", choices=GRAMMARS, default="free")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    img, det = render_many(torch.arange(a.n), grammar=a.grammar)
    dt = time.perf_counter() - t0
    res = {"n": a.n, "grammar": a.grammar, "high_freq_share_below_8px": high_freq_share(img), **token_shares(det),
           "pixels_textured": float(det.mean()), "render_s_per_scene_cpu": dt / a.n,
           "fashion_mnist_high_freq_share": _fashion_mnist_share(a.n)}
    fm = res["fashion_mnist_high_freq_share"]
    print(f"{a.n} training scenes ({a.grammar}): spectral energy at periods < 8 px {res['high_freq_share_below_8px']:.3f}"
          + (f" (Fashion-MNIST proxy images: {fm:.4f})" if fm is not None else "")
          + f"; tokens (8x8 px) textured {res['textured']:.1%}, flat {res['flat']:.1%}, mixed {res['mixed']:.1%};"
          f" pixels textured {res['pixels_textured']:.1%}; render {1e3 * dt / a.n:.1f} ms/scene (CPU)")
    if a.png:
        save_preview(reference_seeds(8), a.png, grammar=a.grammar)
        print(f"wrote {a.png}")
    return res


if __name__ == "__main__":
    main()
