"""Draws the template-browser thumbnails of the router example workflows (workflows/*_token_router*.jpg):
a token grid with half the tokens computed and the budget slider. Run: .venv/bin/python scripts/make_router_thumbnails.py"""
import math, random
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
    # a token grid: an image-like importance map; the top half of the tokens by score are computed
    n = 12
    random.seed(3)
    def score(i, j, f=0):
        cx, cy = 7.5 + 0.6 * f, 4.5
        return math.exp(-((i - cx) ** 2 + (j - cy) ** 2) / 10) + 0.5 * (j > 7) * abs(math.sin(i + j + f)) + 0.15 * random.random()
    frames = 3 if video else 1
    size = 260 if not video else 140
    gap = 18
    x0 = (S - frames * size - (frames - 1) * gap) // 2 if video else 32
    y0 = 150
    cell = size / n
    for f in range(frames):
        xs = x0 + f * (size + gap)
        sc = [[score(i, j, f) for i in range(n)] for j in range(n)]
        flat = sorted((v for row in sc for v in row), reverse=True)
        thr = flat[len(flat) // 2 - 1]
        for j in range(n):
            for i in range(n):
                v = sc[j][i]
                keep = v >= thr
                base = (60 + int(60 * j / n), 70 + int(40 * j / n), 150 - int(60 * j / n))
                col = (250, 205, 60) if keep and v > 0.7 else ((110, 200, 130) if keep else tuple(int(c * 0.35) for c in base))
                x, y = xs + i * cell, y0 + j * cell
                d.rectangle([x + 1, y + 1, x + cell - 1, y + cell - 1], fill=col)
        d.rectangle([xs - 2, y0 - 2, xs + size + 2, y0 + size + 2], outline=(110, 200, 130), width=3)
        if video:
            d.text((xs, y0 + size + 8), f"frame {f * 4 + 1}", fill=(150, 160, 180), font=font(14))
    if not video:  # legend on the right
        lx = 32 + size + 24
        for k, (col, text) in enumerate([((110, 200, 130), "computed"), ((250, 205, 60), "most important"),
                                         ((40, 45, 70), "skipped (filled back)")]):
            d.rectangle([lx, y0 + 10 + 34 * k, lx + 18, y0 + 28 + 34 * k], fill=col, outline=(120, 130, 150))
            d.text((lx + 26, y0 + 10 + 34 * k), text, fill=(220, 225, 235), font=font(14))
        d.text((lx, y0 + 130), "text tokens:", fill=(150, 160, 180), font=font(14))
        d.text((lx, y0 + 150), "always computed", fill=(150, 160, 180), font=font(14))
    else:
        d.text((x0, y0 + size + 30), "green = computed, dark = skipped (still regions)",
               fill=(150, 160, 180), font=font(13))
    # the budget slider
    sy = 476 if not video else 452
    d.text((32, sy - 30), "budget = share of image tokens computed", fill=(150, 160, 180), font=font(15))
    d.rounded_rectangle([32, sy, 272, sy + 14], radius=7, fill=(50, 60, 90))
    d.rounded_rectangle([32, sy, 32 + 240 * 0.5, sy + 14], radius=7, fill=(64, 180, 240))
    d.ellipse([32 + 120 - 11, sy - 4, 32 + 120 + 11, sy + 18], fill=(240, 240, 250))
    d.text((286, sy - 4), "0.5", fill=(245, 245, 250), font=font(18, True))
    d.text((370, sy - 2), "MODEL → MODEL", fill=(64, 180, 240), font=font(13, True))
    im.save(path, quality=90)

from pathlib import Path
W = str(Path(__file__).resolve().parents[1] / "workflows") + "/"
card(W + "flux1_dev_token_router_t2i.jpg", "FLUX.1-dev", "text to image · elastic token router", False)
card(W + "wan21_t2v_1.3b_token_router.jpg", "Wan 2.1 1.3B", "text to video · elastic token router", True)
