#!/usr/bin/env python3
"""Plot a ``bench_speed.json`` (bench/bench_speed.py) as speedup bars per model and variant.

Each bar is a measured median sampling time relative to the baseline of the same run; the
dashed line marks the issue's target and the dotted one the per-forward ceiling measured in
docs/design_notes.md section 1, so a reader sees how much of the possible gain the sampler keeps.

    python bench/plot_bench.py RESULT.json [MORE.json ...] OUT.png

Several JSONs (e.g. one per model, each from its own process) are drawn side by side.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (model, variant without graph suffix) -> (target, per-forward ceiling) from the issue / docs/design_notes.md
MARKS = {
    ("flux", "2x"): (2.7, 3.06), ("flux", "2x80"): (2.0, None),
    ("wan", "2x"): (6.0, 7.38), ("wan", "2x80"): (3.0, None),
}
TITLES = {"flux": "FLUX.1-dev size, 1024², 28 steps", "wan": "Wan 2.1 1.3B size, 832×480×81, 30 steps, CFG"}


def plot(results: list[dict], meta: dict, out: Path) -> None:
    models = [m for m in ("flux", "wan") if any(r["model"] == m for r in results)]
    fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in results if r["model"] == model and r.get("status") == "ok"]
        labels = [r["variant"] + (f"\n{r['schedule']}" if r.get("schedule") and r["schedule"] != "dynamic" else "") for r in rows]
        speed = [r["speedup"] for r in rows]
        colors = ["#888888" if r["variant"] in ("baseline", "tau0") else ("#2a7ab9" if r.get("cuda_graphs") else "#7fb3de") for r in rows]
        bars = ax.bar(range(len(rows)), speed, color=colors)
        for bar, value in zip(bars, speed):
            ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.2f}x", ha="center", va="bottom", fontsize=8)
        for i, r in enumerate(rows):
            target, ceiling = MARKS.get((model, r["variant"].split("+")[0]), (None, None))
            if target:
                ax.plot([i - 0.45, i + 0.45], [target, target], "k--", lw=1)
            if ceiling:
                ax.plot([i - 0.45, i + 0.45], [ceiling, ceiling], "k:", lw=1)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_ylabel("sampling speedup vs. baseline (median)")
        ax.set_title(TITLES.get(model, model), fontsize=10)
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Dynamic Patch Schedule, forced schedules, through ComfyUI's KSampler — {meta.get('device_name', '')}\n"
                 "dark blue: cuda_graphs on; light: eager; dashed: target; dotted: per-forward ceiling", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=130)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    runs = [json.loads(Path(p).read_text()) for p in argv[:-1]]
    results = [r for run in runs for r in run["results"]]
    plot(results, runs[0].get("meta", {}), Path(argv[-1]))
    print(f"wrote {argv[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
