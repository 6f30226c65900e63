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
