"""Draws the template-browser thumbnails of the Token Merge example workflows (workflows/*_token_merge*.jpg):
a token grid whose neighbours merge in pairs (ratio 0.5, a global pattern) and the ratio slider.
Same card style as scripts/make_router_thumbnails.py. Run: .venv/bin/python scripts/make_merge_thumbnails.py"""
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

F = "/usr/share/fonts/truetype/dejavu/"


def font(size, bold=False):
    return ImageFont.truetype(F + ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"), size)


def card(path, title, subtitle, video):
    S = 512
    im = Image.new("RGB", (S, S))
    d = ImageDraw.Draw(im)
    for y in range(S):  # dark vertical gradient
        t = y / S
        d.line([(0, y), (S, y)], fill=(int(14 + 16 * t), int(20 + 22 * t), int(38 + 22 * t)))
    d.text((32, 28), "ELASTIC TOKENS", fill=(64, 180, 240), font=font(17, True))
    d.text((32, 56), title, fill=(245, 245, 250), font=font(36, True))
    d.text((32, 104), subtitle, fill=(150, 160, 180), font=font(17))
    # a token grid; each pair of horizontal neighbours is one merged token (the same pattern every
    # step and sample: it depends on the grid and the ratio only)
    n = 12
    frames = 3 if video else 1
    size = 260 if not video else 140
    gap = 18
    x0 = (S - frames * size - (frames - 1) * gap) // 2 if video else 32
    y0 = 150
    cell = size / n
    for f in range(frames):
        xs = x0 + f * (size + gap)
        for j in range(n):
            for i in range(0, n, 2):
                shade = (i // 2 + j + f) % 2
                col = (110, 200, 130) if shade else (80, 160, 200)
                x, y = xs + i * cell, y0 + j * cell
                d.rounded_rectangle([x + 1, y + 1, x + 2 * cell - 1, y + cell - 1], radius=3, fill=col)
                d.line([(x + cell, y + 4), (x + cell, y + cell - 4)], fill=tuple(int(c * 0.6) for c in col))
        d.rectangle([xs - 2, y0 - 2, xs + size + 2, y0 + size + 2], outline=(110, 200, 130), width=3)
        if video:
            d.text((xs, y0 + size + 8), f"frame {f * 4 + 1}", fill=(150, 160, 180), font=font(14))
    if not video:  # legend on the right
        lx = 32 + size + 24
        for k, (col, text) in enumerate([((110, 200, 130), "2 tokens -> 1"), ((80, 160, 200), "back: group output")]):
            d.rounded_rectangle([lx, y0 + 10 + 34 * k, lx + 36, y0 + 28 + 34 * k], radius=3, fill=col)
            d.text((lx + 44, y0 + 10 + 34 * k), text, fill=(220, 225, 235), font=font(14))
        d.text((lx, y0 + 96), "same pattern on", fill=(150, 160, 180), font=font(14))
        d.text((lx, y0 + 116), "every step & sample", fill=(150, 160, 180), font=font(14))
        d.text((lx, y0 + 150), "text tokens:", fill=(150, 160, 180), font=font(14))
        d.text((lx, y0 + 170), "never merged", fill=(150, 160, 180), font=font(14))
    else:
        d.text((x0, y0 + size + 30), "neighbours merged in pairs within each frame",
               fill=(150, 160, 180), font=font(13))
    # the ratio slider
    sy = 476 if not video else 452
    d.text((32, sy - 30), "ratio = share of image tokens merged away", fill=(150, 160, 180), font=font(15))
    d.rounded_rectangle([32, sy, 272, sy + 14], radius=7, fill=(50, 60, 90))
    d.rounded_rectangle([32, sy, 32 + 240 * 0.5 / 0.75, sy + 14], radius=7, fill=(64, 180, 240))
    d.ellipse([32 + 160 - 11, sy - 4, 32 + 160 + 11, sy + 18], fill=(240, 240, 250))
    d.text((286, sy - 4), "0.5", fill=(245, 245, 250), font=font(18, True))
    d.text((370, sy - 2), "MODEL → MODEL", fill=(64, 180, 240), font=font(13, True))
    im.save(path, quality=90)


W = Path(__file__).resolve().parents[1] / "workflows"
card(W / "flux1_dev_token_merge_t2i.jpg", "FLUX.1-dev", "text to image · token merge", False)
card(W / "wan21_t2v_1.3b_token_merge.jpg", "Wan 2.1 1.3B", "text to video · token merge", True)
