"""Draws the template-browser thumbnails of the example workflows (workflows/*_token_router*.jpg,
workflows/*_token_merge*.jpg): one card style, a token grid that shows what the node does, and
its slider. Run: .venv/bin/python scripts/make_thumbnails.py"""
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

F = "/usr/share/fonts/truetype/dejavu/"
W = Path(__file__).resolve().parents[1] / "workflows"
S, N, Y0 = 512, 12, 150  # card size, grid cells per side, grid top
MUTED, TEXT, ACCENT, GREEN = (150, 160, 180), (220, 225, 235), (64, 180, 240), (110, 200, 130)


def font(size, bold=False):
    return ImageFont.truetype(F + ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"), size)


def card(path, title, subtitle, video, draw_frame, legend, caption, slider):
    """The shared card: gradient, title, ``draw_frame(d, x, y, size, frame)`` per frame, the
    legend (image) or caption (video), and the slider ``(label, value, max)``."""
    im = Image.new("RGB", (S, S))
    d = ImageDraw.Draw(im)
    for y in range(S):  # dark vertical gradient
        t = y / S
        d.line([(0, y), (S, y)], fill=(int(14 + 16 * t), int(20 + 22 * t), int(38 + 22 * t)))
    d.text((32, 28), "ELASTIC TOKENS", fill=ACCENT, font=font(17, True))
    d.text((32, 56), title, fill=(245, 245, 250), font=font(36, True))
    d.text((32, 104), subtitle, fill=MUTED, font=font(17))
    frames = 3 if video else 1
    size, gap = (140, 18) if video else (260, 18)
    x0 = (S - frames * size - (frames - 1) * gap) // 2 if video else 32
    for f in range(frames):
        xs = x0 + f * (size + gap)
        draw_frame(d, xs, Y0, size, f)
        d.rectangle([xs - 2, Y0 - 2, xs + size + 2, Y0 + size + 2], outline=GREEN, width=3)
        if video:
            d.text((xs, Y0 + size + 8), f"frame {f * 4 + 1}", fill=MUTED, font=font(14))
    if video:
        d.text((x0, Y0 + size + 30), caption, fill=MUTED, font=font(13))
    else:
        legend(d, 32 + size + 24)
    label, value, top = slider
    sy = 452 if video else 476
    d.text((32, sy - 30), label, fill=MUTED, font=font(15))
    d.rounded_rectangle([32, sy, 272, sy + 14], radius=7, fill=(50, 60, 90))
    d.rounded_rectangle([32, sy, 32 + 240 * value / top, sy + 14], radius=7, fill=ACCENT)
    knob = 32 + 240 * value / top
    d.ellipse([knob - 11, sy - 4, knob + 11, sy + 18], fill=(240, 240, 250))
    d.text((286, sy - 4), f"{value:g}", fill=(245, 245, 250), font=font(18, True))
    d.text((370, sy - 2), "MODEL → MODEL", fill=ACCENT, font=font(13, True))
    im.save(path, quality=90)


# ----------------------------------------------------------------------------- router: half the tokens computed

def router_frame(d, xs, y0, size, f):
    """An image-like importance map; the top half of the tokens by score are computed."""
    if f == 0:  # one random stream across the frames of a card
        random.seed(3)

    def score(i, j):
        cx, cy = 7.5 + 0.6 * f, 4.5
        return (math.exp(-((i - cx) ** 2 + (j - cy) ** 2) / 10) + 0.5 * (j > 7) * abs(math.sin(i + j + f))
                + 0.15 * random.random())
    cell = size / N
    sc = [[score(i, j) for i in range(N)] for j in range(N)]
    thr = sorted((v for row in sc for v in row), reverse=True)[N * N // 2 - 1]
    for j in range(N):
        for i in range(N):
            v = sc[j][i]
            base = (60 + int(60 * j / N), 70 + int(40 * j / N), 150 - int(60 * j / N))
            col = ((250, 205, 60) if v > 0.7 else GREEN) if v >= thr else tuple(int(c * 0.35) for c in base)
            x, y = xs + i * cell, y0 + j * cell
            d.rectangle([x + 1, y + 1, x + cell - 1, y + cell - 1], fill=col)


def router_legend(d, lx):
    for k, (col, text) in enumerate([(GREEN, "computed"), ((250, 205, 60), "most important"),
                                     ((40, 45, 70), "skipped (filled back)")]):
        d.rectangle([lx, Y0 + 10 + 34 * k, lx + 18, Y0 + 28 + 34 * k], fill=col, outline=(120, 130, 150))
        d.text((lx + 26, Y0 + 10 + 34 * k), text, fill=TEXT, font=font(14))
    d.text((lx, Y0 + 130), "text tokens:", fill=MUTED, font=font(14))
    d.text((lx, Y0 + 150), "always computed", fill=MUTED, font=font(14))


# ----------------------------------------------------------------------------- merge: neighbours in pairs

def merge_frame(d, xs, y0, size, f):
    """Each pair of horizontal neighbours is one merged token (the same pattern every step and
    sample: it depends on the grid and the ratio only)."""
    cell = size / N
    for j in range(N):
        for i in range(0, N, 2):
            col = GREEN if (i // 2 + j + f) % 2 else (80, 160, 200)
            x, y = xs + i * cell, y0 + j * cell
            d.rounded_rectangle([x + 1, y + 1, x + 2 * cell - 1, y + cell - 1], radius=3, fill=col)
            d.line([(x + cell, y + 4), (x + cell, y + cell - 4)], fill=tuple(int(c * 0.6) for c in col))


def merge_legend(d, lx):
    for k, (col, text) in enumerate([(GREEN, "2 tokens -> 1"), ((80, 160, 200), "back: group output")]):
        d.rounded_rectangle([lx, Y0 + 10 + 34 * k, lx + 36, Y0 + 28 + 34 * k], radius=3, fill=col)
        d.text((lx + 44, Y0 + 10 + 34 * k), text, fill=TEXT, font=font(14))
    for k, text in enumerate(["same pattern on", "every step & sample", "", "text tokens:", "never merged"]):
        d.text((lx, Y0 + 96 + 20 * k - (6 if k > 2 else 0)), text, fill=MUTED, font=font(14))


ROUTER = dict(draw_frame=router_frame, legend=router_legend,
              caption="green = computed, dark = skipped (still regions)",
              slider=("budget = share of image tokens computed", 0.5, 1.0))
MERGE = dict(draw_frame=merge_frame, legend=merge_legend, caption="neighbours merged in pairs within each frame",
             slider=("ratio = share of image tokens merged away", 0.5, 0.75))

if __name__ == "__main__":
    card(W / "flux1_dev_token_router_t2i.jpg", "FLUX.1-dev", "text to image · elastic token router", False, **ROUTER)
    card(W / "wan21_t2v_1.3b_token_router.jpg", "Wan 2.1 1.3B", "text to video · elastic token router", True, **ROUTER)
    card(W / "flux1_dev_token_merge_t2i.jpg", "FLUX.1-dev", "text to image · token merge", False, **MERGE)
    card(W / "wan21_t2v_1.3b_token_merge.jpg", "Wan 2.1 1.3B", "text to video · token merge", True, **MERGE)
