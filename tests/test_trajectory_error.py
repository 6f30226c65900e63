"""bench/trajectory_error.py on the tiny Flux (CPU, training-free): a native-only schedule
reproduces the native images exactly (error 0), coarse steps do not and more of them cost more,
the FLOP reduction is the node's, and a malformed schedule fails before any sampling."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run single-threaded


@pytest.fixture(scope="module")
def script(pack):
    spec = importlib.util.spec_from_file_location("trajectory_error", REPO / "bench" / "trajectory_error.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_native_schedule_is_exact_and_coarse_steps_are_not(script, capsys):
    rows = script.main(["--model", "tiny-flux", "--size", "64", "--n", "3", "--batch", "2",
                        "--schedules", "1x8; 2x3,1x5 ;2x6,1x2"])
    out = capsys.readouterr().out
    assert [r["schedule"] for r in rows] == ["1x8", "2x3,1x5", "2x6,1x2"]
    native, early, most = rows
    assert native["mse"] == 0.0 and native["flop_reduction"] == pytest.approx(1.0)
    assert 0.0 < early["mse"] < most["mse"]  # more coarse steps, further from the native images
    assert 1.0 < early["flop_reduction"] < most["flop_reduction"]
    assert all(0.0 <= r["share_1_8"] <= r["share_1_16"] <= 1.0 for r in rows[1:])  # larger squares keep less
    assert "training-free" in out and "2x6,1x2" in out


def test_bad_schedule_fails_before_sampling(script):
    with pytest.raises(ValueError, match="forced_schedule"):
        script.main(["--model", "tiny-flux", "--size", "64", "--n", "2", "--schedules", "2x3,1x5;3x8"])
