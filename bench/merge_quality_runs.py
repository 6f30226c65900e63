#!/usr/bin/env python3
"""Merge the rows of several bench/bench_quality.py runs of the SAME model, seeds, n and steps
into one table and one Pareto plot (runs split across device calls, e.g. training-free rows in one
call and adapter rows in the next).

    python bench/merge_quality_runs.py RUN_DIR[=LABEL] [RUN_DIR[=LABEL] ...] --out DIR

A run's raw output is its ``bench_quality.json``, or that file gzipped (``bench_quality.json.gz``:
raw runs are stored compressed in the repository).

``=LABEL`` names the adapter of that run: its ``+A`` rows become ``setting [LABEL]``, so runs with
different adapters can hold settings of the same name. ``--drop SETTING`` leaves a row out (one
measured with code that has since changed); ``--rename OLD NEW`` names a row of any run NEW, so a
setting written with a node default that has since changed (``router=0.5`` when the default
scorer was another) gets the name that says what ran. Per-seed values stay in the source runs' JSON.

Rows are keyed by setting name; a row present in several runs (the baseline, a fewer-steps
competitor) is taken from the first run that has it, and the runs must agree on it: the same
baseline FID is checked, since every run samples the same seeds on the same code path. The
baseline's spread (seeds B, perturbed) comes from the first run that measured it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality  # noqa: E402

SAME = ("n", "steps", "seed", "sampler", "scheduler", "cfg")


def read_run(folder: Path) -> dict:
    """A bench_quality run's record from ``folder`` (``bench_quality.json`` or ``.json.gz``)."""
    plain, packed = folder / "bench_quality.json", folder / "bench_quality.json.gz"
    if plain.is_file():
        return json.loads(plain.read_text())
    if packed.is_file():
        return json.loads(gzip.decompress(packed.read_bytes()))
    raise SystemExit(f"{folder}: no bench_quality.json(.gz)")


def label_adapter_rows(record: dict, label: str) -> dict:
    """``record`` with its adapter rows (``+A``) renamed ``setting [label]``."""
    rows = [{**r, "setting": f"{r['setting']} [{label}]"} if "+A" in r["setting"] else r
            for r in record["rows"]]
    return {**record, "rows": rows}


def _check_paired(a: dict, b: dict) -> None:
    """Runs of which one has no FID (``--no-fid``) are the same samples if a row both measured
    (a fewer-steps competitor: the plain sampler on the same seeds) has the same LPIPS to its
    baseline; without such a row they are not merged."""
    lpips = {x["setting"]: x.get("lpips") for x in a["rows"] if x["kind"] != "baseline" and x.get("lpips") is not None}
    shared = [(x["setting"], lpips[x["setting"]], x["lpips"]) for x in b["rows"]
              if x["setting"] in lpips and x.get("lpips") is not None]
    if not shared:
        raise SystemExit("runs without FID share no row to check that their baselines are the same samples: "
                         "not mergeable (run a fewer-steps row in both)")
    for name, la, lb in shared:
        if abs(la - lb) > 1e-6:
            raise SystemExit(f"baselines differ (row {name}: LPIPS {la} vs {lb}): not the same samples")


def rename_rows(record: dict, names: dict[str, str]) -> dict:
    """``record`` with each row named OLD in ``names`` named NEW; NEW must not be a row already."""
    have = {r["setting"] for r in record["rows"]}
    for old, new in names.items():
        if old in have and new in have:
            raise SystemExit(f"--rename {old} {new}: the run already has a row {new!r}")
    return {**record, "rows": [{**r, "setting": names.get(r["setting"], r["setting"])} for r in record["rows"]]}


def merge(records: list[dict], drop: tuple[str, ...] = ()) -> dict:
    first = records[0]
    for r in records[1:]:
        diff = {k: (first["meta"].get(k), r["meta"].get(k)) for k in SAME if first["meta"].get(k) != r["meta"].get(k)}
        if diff or r["meta"]["model"].get("name") != first["meta"]["model"].get("name"):
            raise SystemExit(f"runs differ in {diff or 'model'}: not mergeable")
        b0 = next(x for x in first["rows"] if x["kind"] == "baseline")
        b1 = next(x for x in r["rows"] if x["kind"] == "baseline")
        if b0["fid"] is None or b1["fid"] is None:
            _check_paired(first, r)
        elif abs(b0["fid"] - b1["fid"]) > 1e-6:
            raise SystemExit(f"baselines differ (FID {b0['fid']} vs {b1['fid']}): not the same samples")
    rows, seen = [], set()
    for rec in records:
        for row in rec["rows"]:
            if row["setting"] not in seen and row["setting"] not in drop:
                seen.add(row["setting"])
                rows.append({k: v for k, v in row.items() if k != "per_seed"})
    order = {"baseline": 0, "baseline_seeds_b": 1, "baseline_perturbed": 2, "node": 3, "fewer_steps": 4}
    # a run cut by a time limit wrote its rows before the end, which sets each row's FLOP reduction
    base_flops = next((r.get("token_flops") for r in rows if r["kind"] == "baseline"), None)
    for r in rows:
        if r.get("flops_reduction") is None and base_flops and r.get("token_flops"):
            r["flops_reduction"] = base_flops / r["token_flops"]
    rows.sort(key=lambda r: (order.get(r["kind"], 9), -(r.get("flops_reduction") or 0) if r["kind"] == "fewer_steps" else 0))
    spread = {}
    for rec in records:
        for k, v in rec.get("spread", {}).items():
            if v is not None and spread.get(k) is None:
                spread[k] = v
    meta = dict(first["meta"])
    meta["merged_from"] = [rec["meta"].get("command") for rec in records]
    meta["notes"] = [n for rec in records for n in rec["meta"].get("notes", []) if "failed" not in n]
    return {"meta": meta, "rows": rows, "spread": spread}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="RUN_DIR or RUN_DIR=LABEL (LABEL: the adapter of its +A rows)")
    p.add_argument("--out", required=True)
    p.add_argument("--drop", action="append", default=[], help="leave out the row of this setting (repeatable)")
    p.add_argument("--rename", nargs=2, action="append", default=[], metavar=("OLD", "NEW"),
                   help="name the row OLD of every run NEW (repeatable), e.g. --rename router=0.5 router=0.5/scorer=context")
    args = p.parse_args(argv)
    names = dict(args.rename)
    records = []
    for spec in args.runs:
        folder, _, label = spec.partition("=")
        record = read_run(Path(folder))
        record = rename_rows(record, names)
        records.append(label_adapter_rows(record, label) if label else record)
    record = merge(records, tuple(args.drop))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_quality.json").write_text(json.dumps(record, indent=1, default=bench_quality._json_default))
    (out / "bench_quality.md").write_text(bench_quality.markdown(record))
    bench_quality.plot(record, out / "pareto.png")
    print(bench_quality.markdown(record))


if __name__ == "__main__":
    main()
