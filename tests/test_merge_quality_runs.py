"""bench/merge_quality_runs.py: benchmark runs split across device calls merge only when they
sampled the same thing, and the merged table keeps each row once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def _record(rows, fid=37.1, n=2000, model="image-proxy", spread=None):
    meta = {"n": n, "steps": 28, "seed": 0, "sampler": "euler", "scheduler": "simple", "cfg": 3.0,
            "model": {"name": model}, "command": "bench", "notes": ["ok", "setting x failed: AdapterError"]}
    base = {"setting": "baseline", "kind": "baseline", "fid": fid}
    return {"meta": meta, "rows": [base] + rows, "spread": spread or {}}


def _row(name, kind="node", flops=None):
    return {"setting": name, "kind": kind, "fid": 50.0, "flops_reduction": flops}


def test_merge_keeps_each_row_once_and_orders_them():
    import merge_quality_runs as m

    a = _record([_row("2x"), _row("11 steps", "fewer_steps", 2.5)], spread={"fid_seeds_b": 37.9, "lpips_perturbed": None})
    b = _record([_row("2x+A"), _row("11 steps", "fewer_steps", 2.5), _row("13 steps", "fewer_steps", 2.1)],
                spread={"lpips_perturbed": 0.001})
    merged = m.merge([a, b])
    names = [r["setting"] for r in merged["rows"]]
    assert names == ["baseline", "2x", "2x+A", "11 steps", "13 steps"]
    assert merged["spread"] == {"fid_seeds_b": 37.9, "lpips_perturbed": 0.001}
    assert merged["meta"]["notes"] == ["ok", "ok"]  # rows that failed in one run are not carried over


@pytest.mark.parametrize("change", [dict(fid=40.0), dict(n=1000), dict(model="video-proxy")])
def test_runs_of_other_samples_are_refused(change):
    import merge_quality_runs as m

    with pytest.raises(SystemExit, match="differ"):
        m.merge([_record([_row("2x")]), _record([_row("2x+A")], **change)])


def test_runs_without_fid_merge_when_a_shared_row_has_the_same_lpips():
    import merge_quality_runs as m

    def steps(lpips):
        return {**_row("20 steps", "fewer_steps", 1.5), "lpips": lpips}
    with_fid = _record([steps(0.0061), _row("2x")])
    without = _record([steps(0.0061), _row("2x+A")], fid=None)
    names = [r["setting"] for r in m.merge([with_fid, without])["rows"]]
    assert names == ["baseline", "2x", "2x+A", "20 steps"]
    cut = _record([steps(0.0061), {**_row("router"), "flops_reduction": None, "token_flops": 2.0}], fid=None)
    cut["rows"][0]["token_flops"] = 3.0  # a run cut before its end: the row's reduction comes from its FLOPs
    with_fid["rows"][0]["token_flops"] = 3.0
    assert next(r for r in m.merge([with_fid, cut])["rows"] if r["setting"] == "router")["flops_reduction"] == 1.5
    with pytest.raises(SystemExit, match="differ"):  # other samples: the shared row disagrees
        m.merge([with_fid, _record([steps(0.0070)], fid=None)])
    with pytest.raises(SystemExit, match="share no row"):  # nothing to check it by
        m.merge([with_fid, _record([_row("2x+A")], fid=None)])


def test_labels_keep_same_named_adapter_rows_of_different_adapters_apart():
    import merge_quality_runs as m

    a = m.label_adapter_rows(_record([_row("2x+A"), _row("2x")]), "2p")
    b = m.label_adapter_rows(_record([_row("2x+A"), _row("2x+A*1.1")]), "2p4p")
    names = [r["setting"] for r in m.merge([a, b])["rows"]]
    assert names == ["baseline", "2x+A [2p]", "2x", "2x+A [2p4p]", "2x+A*1.1 [2p4p]"]  # training-free rows keep their name


def test_runs_are_read_plain_or_gzipped(tmp_path):
    import gzip
    import json

    import merge_quality_runs as m

    record = _record([_row("2x")])
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "bench_quality.json").write_text(json.dumps(record))
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "bench_quality.json.gz").write_bytes(gzip.compress(json.dumps(record).encode()))
    assert m.read_run(tmp_path / "plain") == m.read_run(tmp_path / "packed") == record
    with pytest.raises(SystemExit, match="no bench_quality.json"):
        m.read_run(tmp_path)


def test_rename_names_a_row_by_what_ran(tmp_path, monkeypatch):
    import gzip
    import json

    import bench_quality
    import merge_quality_runs as m

    monkeypatch.setattr(bench_quality, "markdown", lambda record: "table")  # the table and plot have their tests
    monkeypatch.setattr(bench_quality, "plot", lambda record, path: None)

    record = _record([_row("router=0.5"), _row("20 steps", "fewer_steps", 1.4)])
    renamed = m.rename_rows(record, {"router=0.5": "router=0.5/scorer=context"})
    assert [r["setting"] for r in renamed["rows"]] == ["baseline", "router=0.5/scorer=context", "20 steps"]
    assert record["rows"][1]["setting"] == "router=0.5"  # the run read is not changed
    with pytest.raises(SystemExit, match="already has a row"):
        m.rename_rows(record, {"router=0.5": "20 steps"})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "bench_quality.json.gz").write_bytes(gzip.compress(json.dumps(record).encode()))
    m.main([str(tmp_path / "run"), "--rename", "router=0.5", "router=0.5/scorer=context", "--out", str(tmp_path / "out")])
    merged = json.loads((tmp_path / "out" / "bench_quality.json").read_text())
    assert [r["setting"] for r in merged["rows"]] == ["baseline", "router=0.5/scorer=context", "20 steps"]


def test_dropped_rows_and_per_seed_values_are_left_out():
    import merge_quality_runs as m

    row = {**_row("tau=0.7+A"), "per_seed": {"lpips": [0.1, 0.2]}}
    merged = m.merge([_record([row, _row("2x")])], drop=("tau=0.7+A",))
    assert [r["setting"] for r in merged["rows"]] == ["baseline", "2x"]
    merged = m.merge([_record([row])])
    assert "per_seed" not in merged["rows"][1]


def test_merged_runs_plot_one_colour_per_adapter(tmp_path, monkeypatch):
    import bench_quality
    import merge_quality_runs as m

    def rec(rows, label):
        r = _record([{**x, "lpips": 0.1, "flops_reduction": 2.0} for x in rows])
        r["rows"][0].update(lpips=0.0, flops_reduction=1.0, steps=28)
        r["meta"].update(real={"name": "test"}, device="cpu")
        return m.label_adapter_rows(r, label)

    merged = m.merge([rec([_row("2x+A"), _row("2x")], "v1"), rec([_row("2x+A")], "v2")])
    merged["meta"]["merged_from"] = ["a", "b"]
    labels = []
    import matplotlib.axes

    real_scatter = matplotlib.axes.Axes.scatter
    monkeypatch.setattr(matplotlib.axes.Axes, "scatter",
                        lambda self, *a, **k: labels.append(k.get("label")) or real_scatter(self, *a, **k))
    bench_quality.plot(merged, tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").stat().st_size > 0
    assert labels[:3] == ["Dynamic Patch Schedule, training-free", "Dynamic Patch Schedule + patch adapter v1",
                          "Dynamic Patch Schedule + patch adapter v2"]  # FID axis only: merged wall times differ
    assert len(labels) == 6  # two panels (FID, LPIPS) x three groups; no measured-speedup row
