"""bench/bench_speed.py's "+A" variants: a real (untrained) patch adapter attached to the model it
times, on the tiny Flux at CPU size (the GPU numbers are in BENCHMARKS.md, not asserted here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def test_adapter_variants_parse_and_run_eager(pack):
    import bench_speed

    v = bench_speed.build_variants("2x80+A,s=4x2/2x4/1x2+A", "both", 8)
    assert [(x.name, x.schedule, x.adapter, x.cuda_graphs) for x in v] == [
        ("2x80+A", "1x2,2x6", True, False), ("s=4x2/2x4/1x2+A", "4x2,2x4,1x2", True, False)]
    with pytest.raises(ValueError, match="does not have 8 steps"):
        bench_speed.build_variants("s=2x3+A", "both", 8)


def test_adapter_variant_times_adapter_steps(pack, tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "bench_speed.py"), "--tiny", "--models", "flux", "--steps", "6",
           "--repeats", "1", "--warmup", "0", "--cuda-graphs", "off", "--variants", "2x80,s=4x2/2x2/1x2+A",
           "--adapter-rank", "4", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r["variant"]: r for r in json.loads((tmp_path / "bench_speed.json").read_text())["results"]}
    plain, adapted = rows["2x80"], rows["s=4x2/2x2/1x2+A"]
    assert "adapter" not in plain and plain["last_report"]["report"]["adapter_calls"] == 0
    assert adapted["adapter"] == {"factors": [2, 4], "rank": 4} and adapted["finite"]
    assert adapted["last_report"]["report"]["adapter_calls"] == 4  # the 4 coarse steps, cfg 1


def test_router_variants_parse_with_their_settings_and_schedules(pack):
    import bench_speed

    v = bench_speed.build_variants("router=0.5,router=0.3/scorer=context/fill=nearest/start=0/end=0.9/refresh=0,"
                                   "router=0.5@2x80,router=0.75/start=0@s=2x2/1x6", "both", 8)
    assert [(x.name, x.kind, x.schedule, x.cuda_graphs) for x in v] == [
        ("router=0.5", "router", "", False),
        ("router=0.3/scorer=context/fill=nearest/start=0/end=0.9/refresh=0", "router", "", False),
        ("router=0.5@2x80", "router", "1x2,2x6", False), ("router=0.75/start=0@s=2x2/1x6", "router", "2x2,1x6", False)]
    assert v[1].router == {"budget": 0.3, "scorer": "context", "fill": "nearest", "start_percent": 0.0,
                           "end_percent": 0.9, "refresh_every": 0}
    assert v[3].router == {"budget": 0.75, "start_percent": 0.0}
    assert bench_speed.build_variants("router=0.5/attend=1", "both", 8)[0].router == {"budget": 0.5,
                                                                                      "attend_skipped": True}
    with pytest.raises(ValueError, match="attend=1"):
        bench_speed.build_variants("router=0.5/attend=yes", "both", 8)
    assert bench_speed.build_variants("router=0.5/uncond=0.2", "both", 8)[0].router == {"budget": 0.5,
                                                                                        "uncond_budget": 0.2}
    with pytest.raises(ValueError, match="uncond_budget must be a share"):
        bench_speed.build_variants("router=0.5/uncond=0", "both", 8)
    # the node's own validation speaks for bad settings, before any model is built
    with pytest.raises(ValueError, match="budget must be a share"):
        bench_speed.build_variants("router=0.05", "both", 8)
    with pytest.raises(ValueError, match="unknown router option 'tau=1'"):
        bench_speed.build_variants("router=0.5/tau=1", "both", 8)
    with pytest.raises(ValueError, match="scorer must be one of"):
        bench_speed.build_variants("router=0.5/scorer=magic", "both", 8)
    with pytest.raises(ValueError, match="has 9 steps"):
        bench_speed.build_variants("router=0.5@s=2x9", "both", 8)


def test_router_variants_run_and_report_their_tokens_per_step(pack, tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "bench_speed.py"), "--tiny", "--models", "flux", "--steps", "6",
           "--repeats", "1", "--warmup", "0", "--cuda-graphs", "off", "--variants",
           "baseline,router=1.0,router=0.5/start=0/refresh=0,router=0.5/start=0/refresh=0@s=1x1/2x2/1x3,"
           "router=0.5/start=0/refresh=0/scorer=learned",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r["variant"]: r for r in json.loads((tmp_path / "bench_speed.json").read_text())["results"]}
    idle, routed = rows["router=1.0"], rows["router=0.5/start=0/refresh=0"]
    stacked = rows["router=0.5/start=0/refresh=0@s=1x1/2x2/1x3"]
    n = idle["step_tokens"][0]
    assert idle["step_tokens"] == [n] * 6 and idle["config"]["router"]["budget"] == 1.0
    assert routed["step_tokens"] == [n] + [n // 2] * 5 and routed["finite"]
    learned = rows["router=0.5/start=0/refresh=0/scorer=learned"]  # an untrained router network, timed
    assert learned["step_tokens"] == routed["step_tokens"] and learned["config"]["router"]["scorer"] == "learned"
    coarse = stacked["step_tokens"][1]
    assert stacked["step_tokens"] == [n, coarse, coarse, n, n // 2, n // 2] and coarse < n
    assert stacked["config"]["schedule"] == "1x1,2x2,1x3"
    assert stacked["last_report"]["report"]["step_factors"] == [1, 2, 2, 1, 1, 1]
    assert "image tokens run per step: mean" in (tmp_path / "bench_speed.md").read_text()


def test_merge_variants_parse(pack):
    """``merge=R[:ORDER[:MODE]][@SCHED]``: settings checked by the pack's own kernel, a stacked
    schedule by the patch schedule's parser."""
    import bench_speed

    v = bench_speed.build_variants("merge=0.5,merge=0.25:border_first:both,merge=0.5@2x80,"
                                   "merge=0.75::across_frames@s=2x2/1x6,merge=0.5:::noprop", "both", 8)
    assert [(x.name, x.kind, x.schedule, x.merge) for x in v] == [
        ("merge=0.5", "merge", "", (0.5, "spread", "within_frames", True, "velocity")),
        ("merge=0.25:border_first:both", "merge", "", (0.25, "border_first", "both", True, "velocity")),
        ("merge=0.5@2x80", "merge", "1x2,2x6", (0.5, "spread", "within_frames", True, "velocity")),
        ("merge=0.75::across_frames@s=2x2/1x6", "merge", "2x2,1x6", (0.75, "spread", "across_frames", True, "velocity")),
        ("merge=0.5:::noprop", "merge", "", (0.5, "spread", "within_frames", False, "velocity"))]
    (copy,) = bench_speed.build_variants("merge=0.5:::copy:noprop", "both", 8)
    assert copy.merge == (0.5, "spread", "within_frames", False, "copy")
    with pytest.raises(ValueError, match="use merge=R"):
        bench_speed.build_variants("merge=0.5:::copy:residual", "both", 8)
    for bad, match in (("merge=0.8", r"ratio must be in \[0, 0.75\]"), ("merge=x", "not a number"),
                       ("merge=0.5:middle", "order must be one of"), ("merge=0.5@s=2x3", "has 3 steps"),
                       ("merge=0.5:spread:both:extra", "use merge=R"),
                       ("merge=0.5:spread:both:noprop:x", "use merge=R"), ("merge=0.5:::copy:copy", "use merge=R")):
        with pytest.raises(ValueError, match=match):
            bench_speed.build_variants(bad, "both", 8)


def test_merge_variants_run_through_the_node(pack, tmp_path):
    """The tiny Flux through the bench: merged steps counted in the report, coarse steps of a
    stacked schedule not merged, token counts from the node's own pattern."""
    cmd = [sys.executable, str(REPO / "bench" / "bench_speed.py"), "--tiny", "--models", "flux", "--steps", "5",
           "--repeats", "1", "--warmup", "0", "--cuda-graphs", "off", "--variants", "merge=0.5,merge=0.75@s=2x2/1x3",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r["variant"]: r for r in json.loads((tmp_path / "bench_speed.json").read_text())["results"]}
    alone, stacked = rows["merge=0.5"], rows["merge=0.75@s=2x2/1x3"]
    assert alone["finite"] and alone["last_report"]["report"]["step_merged"] == [32] * 5  # 64 tokens -> 32
    assert alone["tokens"] == {"1": 32 + 512} and alone["config"]["ratio"] == 0.5
    rep = stacked["last_report"]["report"]
    assert rep["step_factors"] == [2, 2, 1, 1, 1] and rep["step_merged"] == [0, 0, 48, 48, 48]
    assert stacked["tokens"] == {"1": 16 + 512, "2": 16 + 512}
