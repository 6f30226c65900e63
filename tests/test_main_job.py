"""The main job (bench/run_example.py) and its image metrics (bench/image_metrics.py).

* Metric tests, plain numpy: PSNR/SSIM of identical images are inf / 1.0, known values, more noise
  scores lower, animated WEBP frames read back exactly.
* Helpers of run_example: the speed-setting schedule, the node's log line parser, the per-prompt
  time limit (none by default; --timeout / ELASTIC_TOKENS_PROMPT_TIMEOUT) and its message, the
  per-prompt progress line (rewritten on a terminal, appended to in a log).
* ``server``: run_example's core (``run_case``) on the FLUX workflow at 64x64, 4 steps, against
  the session's real headless ComfyUI with the tiny models: baseline (node bypassed), accelerated
  (forced schedule) and dynamic runs succeed with finite numbers and the side-by-side PNG.
* ``server``, the default main job (``--models proxy``): a second real ComfyUI with the proxy nodes
  (benchmarks/proxy/custom_nodes, via --extra-model-paths-config) runs the proxy workflows: the
  TRAINED image proxy (batch 2, 4 steps) and the video workflow on a tiny RANDOM Wan written like
  the video trainer exports (its trained weights do not exist yet). Grid and schedule PNGs have the
  expected sizes, accelerated differs from the baseline, the per-step schedule read from the proxy
  loader's log line is the forced one (and the plot draws it). ``main()`` end to end (batch 2,
  2 steps) prints the report and a progress line per prompt, skips a missing video proxy with a
  message, and keeps ComfyUI's own output out of the terminal (captured at the file descriptors) in
  the log file whose path it prints. A prompt past a --timeout stops with a message on how to raise it.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# Not the repo root on sys.path: the pack's own `nodes/` would shadow ComfyUI's `nodes` module.
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests" / "support"))
import image_metrics  # noqa: E402
import run_example  # noqa: E402
from image_metrics import psnr, ssim  # noqa: E402


def _image(seed: int = 0, size: int = 64) -> np.ndarray:
    """A smooth test picture with some edges (0..255, H x W x 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([128 + 100 * np.sin(6 * x + 2 * y), 128 + 100 * np.cos(5 * y),
                     255 * (x > 0.5) * (y > 0.3)], axis=-1)
    return np.clip(base + rng.normal(0, 3, base.shape), 0, 255)


def _noisy(img: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    return np.clip(img + np.random.default_rng(seed).normal(0, sigma, img.shape), 0, 255)


# =========================================================================== metrics


def test_identical_images_score_inf_and_one():
    img = _image()
    assert psnr(img, img.copy()) == math.inf
    assert ssim(img, img.copy()) == pytest.approx(1.0, abs=1e-12)
    video = np.stack([_image(s) for s in range(3)])
    assert psnr(video, video) == math.inf and ssim(video, video) == pytest.approx(1.0, abs=1e-12)


def test_psnr_known_value():
    img = _image()[:, :, 0] * 0 + 100.0  # flat grey, so +10 everywhere is an MSE of exactly 100
    assert psnr(img, img + 10) == pytest.approx(10 * math.log10(255 ** 2 / 100), abs=1e-9)
    assert psnr(img, img + 10, data_range=1.0) == pytest.approx(-20.0, abs=1e-9)


def test_more_noise_scores_lower():
    img = _image()
    mild, heavy = _noisy(img, 5), _noisy(img, 40)
    assert math.isfinite(psnr(img, mild)) and math.isfinite(psnr(img, heavy))
    assert psnr(img, heavy) < psnr(img, mild) - 10  # 8x the noise: about 18 dB lower
    assert ssim(img, heavy) < ssim(img, mild) < 1.0
    assert 0.0 < ssim(img, heavy) < 0.5 < ssim(img, mild)  # about 0.16 and 0.86


def test_ssim_sees_structure_that_psnr_misses():
    # same MSE for a constant shift and for noise: PSNR equal, SSIM much higher for the shift
    img = _image()[:, :, :1] * 0.5 + 64
    shifted = img + 8.0
    noisy = img + np.random.default_rng(3).choice([-8.0, 8.0], img.shape)
    assert psnr(img, shifted) == pytest.approx(psnr(img, noisy), abs=1e-9)
    assert ssim(img, shifted) > 0.95 > ssim(img, noisy)


def test_ssim_is_symmetric_and_checks_shapes():
    a, b = _image(0), _noisy(_image(0), 20)
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-12)
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(a, a[:32])
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, a[..., :1])
    assert ssim(a[:5, :5], b[:5, :5]) <= 1.0  # smaller than the 11x11 window still works


def test_animated_webp_frames_round_trip(tmp_path):
    from PIL import Image

    frames = [_image(s, 32).astype(np.uint8) for s in range(3)]
    path = tmp_path / "clip.webp"
    Image.fromarray(frames[0]).save(path, save_all=True, append_images=[Image.fromarray(f) for f in frames[1:]],
                                    lossless=True, duration=62)
    loaded = image_metrics.load_frames(path)
    assert loaded.shape == (3, 32, 32, 3)
    assert psnr(np.stack(frames).astype(np.float64), loaded) == math.inf
    png = tmp_path / "one.png"
    Image.fromarray(frames[1]).save(png)
    assert image_metrics.load_frames(png).shape == (1, 32, 32, 3)


# =========================================================================== run_example helpers


def test_speed_schedule():
    assert run_example.speed_schedule(28) == "1x6,2x22"   # the FLUX example: ~80% at 2p
    assert run_example.speed_schedule(30) == "1x6,2x24"
    assert run_example.speed_schedule(4) == "1x1,2x3"
    assert run_example.speed_schedule(2) == "1x1,2x1"     # always at least one native step


def test_parse_schedule_line():
    line = ("Dynamic Patch Schedule: 28/28 steps (6 at p, 22 at 2p, 0 at 4p); 40% of transformer FLOPs "
            "skipped, ~1.67x estimated; sampling took 1.83 s")
    assert run_example.parse_schedule_line(line) == {
        "nodes": "Dynamic Patch Schedule", "steps": "28/28", "parts": "6 at p, 22 at 2p, 0 at 4p",
        "flops_skipped_pct": 40.0, "estimated_speedup": 1.67, "tokens_skipped_pct": 0.0, "sampling_s": 1.83}
    assert run_example.parse_schedule_line("something else") == {}


def test_prompt_timeout_is_off_by_default(monkeypatch):
    monkeypatch.delenv(run_example.PROMPT_TIMEOUT_ENV, raising=False)
    assert run_example.prompt_timeout() is None
    assert run_example.prompt_timeout(0) is None and run_example.prompt_timeout(-1) is None
    assert run_example.prompt_timeout(90) == 90.0
    monkeypatch.setenv(run_example.PROMPT_TIMEOUT_ENV, "1200")
    assert run_example.prompt_timeout() == 1200.0
    assert run_example.prompt_timeout(30) == 30.0  # the flag wins
    monkeypatch.setenv(run_example.PROMPT_TIMEOUT_ENV, "0")
    assert run_example.prompt_timeout() is None
    monkeypatch.setenv(run_example.PROMPT_TIMEOUT_ENV, "ten")
    with pytest.raises(SystemExit, match="not a number"):
        run_example.prompt_timeout()
    text = run_example.timeout_message("baseline", 300, "out/comfyui_server.log")
    assert "300 s" in text and "--timeout 1200" in text and "--timeout 0" in text
    assert run_example.PROMPT_TIMEOUT_ENV in text and "out/comfyui_server.log" in text


class _Stream:
    def __init__(self, tty: bool):
        self.text, self.tty = "", tty

    def write(self, text):
        self.text += text

    def flush(self):
        pass

    def isatty(self):
        return self.tty


def test_progress_line_in_a_log_and_on_a_terminal(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(run_example.time, "monotonic", lambda: clock[0])
    log = _Stream(tty=False)
    line = run_example.PromptProgress("   [2/5] baseline    ", stream=log, every=10)
    for step in range(1, 29):  # one step a second
        clock[0] += 1
        line.update((step, 28))
    line.finish("done: 28/28 steps")
    # one line: the label, the step reached every 10 s, the result
    assert log.text == "   [2/5] baseline     step 10/28 (10 s), step 20/28 (20 s), done: 28/28 steps\n"

    tty = _Stream(tty=True)
    line = run_example.PromptProgress("   [1/1] dynamic", stream=tty)
    clock[0] += 1
    line.update(None)
    clock[0] += 1
    line.update((1, 4))
    line.update((2, 4))
    line.finish("done")
    frames = tty.text.split("\r")[1:]
    assert [f.split()[2:4] for f in frames[:-1]] == [["starting", "0"], ["starting", "1"], ["step", "1/4"],
                                                    ["step", "2/4"]]
    assert frames[-1].endswith("done\x1b[K\n") and tty.text.count("\n") == 1


# =========================================================================== against a real server


def test_main_job_core_on_flux(comfy_server, tmp_path):
    case = run_example.make_case("flux", width=64, height=64, steps=4)
    assert case.schedule == "1x1,2x3"
    result = run_example.run_case(comfy_server, case, dynamic=True, out_dir=tmp_path)

    assert [r.name for r in result.runs] == ["baseline", "accelerated", "dynamic"]
    base, acc, dyn = result.runs
    for r in result.runs:
        assert r.files and all(f.is_file() for f in r.files), r.name
        assert r.frames.shape == (1, 64, 64, 3), r.name
        for value in (r.prompt_s, r.sampler_s, r.speedup, r.prompt_speedup, r.ssim):
            assert value is not None and math.isfinite(value) and value > -1, (r.name, value)
        assert 0 < r.sampler_s <= r.prompt_s + 0.5, r.name
    # the baseline against itself, the accelerated run against the baseline
    assert base.psnr == math.inf and base.ssim == pytest.approx(1.0)
    assert base.log_line is None and base.speedup == pytest.approx(1.0)
    assert math.isfinite(acc.psnr) and acc.ssim < 1.0, "coarse steps should change the output"
    assert acc.log["parts"] == "1 at p, 3 at 2p, 0 at 4p" and acc.log["flops_skipped_pct"] > 0
    assert acc.log["sampling_s"] and math.isfinite(acc.log["sampling_s"])
    assert dyn.log and dyn.log["steps"] == "4/4"
    assert result.side_by_side == tmp_path / "flux_side_by_side.png" and result.side_by_side.is_file()

    from PIL import Image

    with Image.open(result.side_by_side) as im:
        assert im.width > 2 * 64 and im.height > 64
    text = run_example.report(result)
    assert "baseline" in text and "accelerated" in text and "1x1,2x3" in text


# =========================================================================== the default: trained proxies


def test_run_length_and_proxy_line():
    assert run_example.run_length([1, 1, 2, 2, 2, 4, 1]) == "1x2,2x3,4x1,1x1"
    assert run_example.run_length([]) == ""
    line = ('Proxy schedule: {"source": "Dynamic Patch Schedule", "steps": 3, "latent": [2, 16, 32, 32], '
            '"factors": [1, 2, 4], "tokens": [256, 64, 16]}')
    assert run_example.parse_proxy_line(line)["tokens"] == [256, 64, 16]


def test_proxy_class_names_are_the_trainers():
    trainer = run_example._load_proxy_module("image_provider").trainer()
    assert run_example.PROXY_CLASS_NAMES == list(trainer.CLASS_NAMES)
    case = run_example.make_case("image", batch=12)
    assert case.item_labels[0].startswith("T-shirt/top") and case.item_labels[11].startswith("Trouser")
    assert case.schedule == "1x4,2x20,1x4" and case.steps == 28  # run_example.proxy_schedule
    video = run_example.make_case("video")
    assert (video.frames, video.item_frames, video.batch, video.steps) == (33, 9, 5, 30)


def test_missing_video_proxy_is_skipped_with_a_message(monkeypatch, tmp_path):
    monkeypatch.setenv("ELASTIC_TOKENS_VIDEO_PROXY_WEIGHTS", str(tmp_path / "none.safetensors"))
    cases, skipped = run_example.select_cases("proxy", "both")
    assert [c.key for c in cases] == ["image"]
    assert len(skipped) == 1 and "video proxy: SKIPPED" in skipped[0] and "none.safetensors" in skipped[0]
    with pytest.raises(SystemExit, match="not one of the proxy workflows"):
        run_example.select_cases("proxy", "flux")


def _write_random_video_proxy(out: Path) -> Path:
    """A tiny RANDOM Wan t2v exported the way train_video_proxy.py exports (ComfyUI's own detection)."""
    import importlib.util
    import json

    import torch
    from safetensors.torch import save_file

    spec = importlib.util.spec_from_file_location("_et_train_video_proxy", REPO / "benchmarks" / "proxy" /
                                                  "train_video_proxy.py")
    trainer = sys.modules.get(spec.name)
    if trainer is None:
        trainer = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = trainer
        spec.loader.exec_module(trainer)
    cfg = trainer.wan_config(trainer.parse_args(["--synthetic", "--dim", "128", "--layers", "1", "--ffn", "256"]))
    torch.manual_seed(0)
    model = trainer.build_model(cfg, "cpu")
    with torch.no_grad():
        model.head.head.weight.normal_(0.0, 0.05)  # the trainer zeroes it: the output would ignore the model
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(out / "video_proxy.safetensors"),
              metadata={"config": json.dumps(cfg), "sampling_shift": "3.0"})
    save_file({"class_tokens": torch.randn(11, 4, 4096).half()}, str(out / "video_proxy_text.safetensors"),
              metadata={"class_names": json.dumps(list(trainer.CLASS_NAMES) + ["<empty>"])})
    return out / "video_proxy.safetensors"


@pytest.fixture(scope="module")
def proxy_server(comfy, tmp_path_factory):
    """A real ComfyUI with this pack and the proxy nodes; the video proxy is a tiny random stand-in."""
    from comfy_server import ComfyServer

    video = _write_random_video_proxy(tmp_path_factory.mktemp("video_proxy"))
    with ComfyServer(extra_args=run_example.proxy_server_args(),
                     env={"ELASTIC_TOKENS_VIDEO_PROXY_WEIGHTS": str(video)}) as server:
        yield server


def _plot_has_colour(path: Path, hex_colour: str, min_pixels: int = 200) -> bool:
    from PIL import Image

    want = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    return int((np.abs(rgb - want).sum(-1) < 40).sum()) >= min_pixels


def _check_proxy_result(result, case, tmp_path, cell: int, frames_per_item: int, tokens: tuple):
    from PIL import Image

    names = (["baseline", "accelerated"] + (["adapter"] if case.use_adapter else []) + ["dynamic"]
             + (["router"] if case.router else []) + (["merge"] if case.merge else []))
    assert [r.name for r in result.runs] == names
    base, acc, dyn = result.runs[0], result.runs[1], result.run("dynamic")
    size = {1: 128, 9: 64}[frames_per_item]
    for r in result.runs:
        assert r.frames.shape == (case.batch * frames_per_item, size, size, 3), r.name
        assert 0 < r.sampler_s <= r.prompt_s + 0.5, r.name
        assert r.schedule["steps"] == case.steps, r.name
    # per-step schedule as the server reports it: the baseline plain, the accelerated run the forced one
    assert base.schedule["source"].startswith("plain model") and base.schedule["factors"] == [1] * case.steps
    assert acc.schedule["source"] == "Dynamic Patch Schedule"
    assert acc.schedule["factors"] == [1] + [2] * (case.steps - 1)
    assert acc.schedule["tokens"] == [tokens[0]] + [tokens[1]] * (case.steps - 1)
    assert acc.log["flops_skipped_pct"] > 0 and dyn.schedule["steps"] == case.steps
    assert base.psnr == math.inf and math.isfinite(acc.psnr) and acc.ssim < 1.0, "coarse steps change the output"
    assert not np.array_equal(base.frames, acc.frames)

    assert result.grid == tmp_path / f"{case.key}_proxy_grid.png"
    with Image.open(result.grid) as im:
        assert im.size == run_example.grid_size(len(names), case.batch, cell, cell)
    assert result.schedule_plot == tmp_path / f"{case.key}_proxy_schedule.png"
    with Image.open(result.schedule_plot) as im:
        assert im.size == run_example.SCHEDULE_PLOT_PX
    for name in ("accelerated", "baseline"):  # both lines are drawn
        assert _plot_has_colour(result.schedule_plot, run_example.RUN_STYLE[name]["color"]), name
    if case.use_adapter:  # the trained adapter: same schedule, used on every coarse call, other pixels
        ada = result.run("adapter")
        assert ada.schedule["factors"] == acc.schedule["factors"]
        assert "coarse calls with the patch adapter" in ada.log_line and "patch adapter" not in acc.log_line
        assert not np.array_equal(ada.frames, acc.frames)
    text = run_example.report(result)
    assert f"per step 1x1,2x{case.steps - 1}" in text and "per step 1x" in text and str(result.grid) in text
    if case.router:  # the router row: native patches, fewer image tokens on its routed steps, its log line
        rou = result.run("router")
        assert rou.schedule["source"] == "Elastic Token Router" and rou.schedule["factors"] == [1] * case.steps
        assert rou.schedule["tokens"][0] == tokens[0] and min(rou.schedule["tokens"]) == tokens[0] // 2
        m = re.search(r"Elastic Token Router: (\d+)% of image tokens skipped, ~[\d.]+x \(budget 0\.5, (\d+) routed",
                      rou.log_line)
        assert m and int(m[1]) > 0 and int(m[2]) > 0, rou.log_line
        assert rou.log["tokens_skipped_pct"] == int(m[1]) and "Dynamic Patch Schedule" not in rou.log_line
        assert math.isfinite(rou.psnr) and not np.array_equal(base.frames, rou.frames)
        assert _plot_has_colour(result.schedule_plot, run_example.RUN_STYLE["router"]["color"])
        assert re.search(r"router .*Elastic Token Router: \d+% of image tokens skipped", text), text
    if case.merge:  # the merge row: native patches, half the image tokens on its merged steps, its log line
        mer = result.run("merge")
        assert mer.schedule["source"] == "Token Merge" and mer.schedule["factors"] == [1] * case.steps
        assert set(mer.schedule["tokens"]) <= {tokens[0], tokens[0] // 2}, mer.schedule["tokens"]
        m = re.search(r"; (\d+)% of image tokens merged away on (\d+)/(\d+) steps", mer.log_line)
        assert m and int(m[1]) == 50 and int(m[3]) == case.steps, mer.log_line
        # the log's merged steps are the steps the proxy saw at half the tokens (first ones: window 0-0.8)
        merged = int(m[2])
        assert 0 < merged and mer.schedule["tokens"] == [tokens[0] // 2] * merged + [tokens[0]] * (case.steps - merged)
        assert "Dynamic Patch Schedule" not in mer.log_line and "Elastic Token Router" not in mer.log_line
        assert math.isfinite(mer.psnr) and not np.array_equal(base.frames, mer.frames)
        assert _plot_has_colour(result.schedule_plot, run_example.RUN_STYLE["merge"]["color"])
        assert re.search(r"merge .*Token Merge: 50% of image tokens merged away on \d+/\d+ steps", text), text


def test_main_job_on_image_proxy(proxy_server, tmp_path):
    case = run_example.make_case("image", steps=4, batch=2)
    assert case.schedule == "1x1,2x3"
    result = run_example.run_case(proxy_server, case, dynamic=True, out_dir=tmp_path)
    _check_proxy_result(result, case, tmp_path, cell=128, frames_per_item=1, tokens=(256, 64))


def test_main_job_on_video_proxy_workflow(proxy_server, tmp_path):
    case = run_example.make_case("video", steps=3, batch=2)
    case.use_adapter = False  # the committed video adapter belongs to the trained proxy, not this random one
    result = run_example.run_case(proxy_server, case, dynamic=True, out_dir=tmp_path)
    _check_proxy_result(result, case, tmp_path, cell=192, frames_per_item=9, tokens=(9 * 8 * 8, 9 * 4 * 4))


def test_the_proxy_server_lists_the_committed_routers_and_patterns(proxy_server):
    """benchmarks/proxy/comfyui_extra_paths.yaml gives the proxy server's Load Token Router and Load
    Merge Pattern the committed files (routers/ and adapters/), so a workflow can pick them."""
    info = proxy_server.object_info()

    def options(node, name):
        spec = info[node]["input"]["required"][name]
        return spec[0] if spec[0] != "COMBO" else spec[1]["options"]

    routers = options("ElasticTokensLoadTokenRouter", "router_name")
    patterns = options("ElasticTokensLoadMergePattern", "pattern_name")
    adapters = options("ElasticTokensLoadPatchAdapter", "adapter_name")
    for proxy in ("image", "detail", "video"):
        assert f"{proxy}_proxy_router.safetensors" in routers
        assert f"{proxy}_proxy_merge_pattern.safetensors" in patterns
    assert "image_proxy_adapter_2x19.safetensors" in adapters
    # the three kinds share the folder; each loader offers only its own kind
    assert not [n for n in routers if "adapter" in n or "pattern" in n], routers
    assert not [n for n in patterns if "adapter" in n or "router" in n], patterns
    assert not [n for n in adapters if "router" in n or "pattern" in n], adapters


def test_prompt_past_its_time_limit_stops_with_a_message(proxy_server):
    case = run_example.make_case("image", steps=2, batch=1)
    prompt = run_example.build_prompt(case, proxy_server.object_info(), node="bypass",
                                      prefix="elastic_tokens/timeout_test")
    with pytest.raises(run_example.PromptTimeout, match=r"did not finish within 0 s.*--timeout") as info:
        run_example.run_prompt(proxy_server, None, prompt, "baseline", "", expect_log=False, timeout=0.001)
    assert str(proxy_server.log_path) in str(info.value)


def test_comfyui_output_in_this_process_is_captured(capfd):
    import logging

    root = logging.getLogger()
    before = root.handlers[:]
    buffer = __import__("io").StringIO()
    with run_example.comfyui_output_to(buffer):
        logging.warning("Cannot import comfy_extras/nodes_canny.py: No module named 'kornia'")  # as nodes.py does
        print("printed")
        print("to stderr", file=sys.stderr)
        root.addHandler(logging.StreamHandler(sys.stderr))  # a handler set up during the import goes away
    assert root.handlers == before
    out, err = capfd.readouterr()
    assert out == err == ""
    assert buffer.getvalue() == "Cannot import comfy_extras/nodes_canny.py: No module named 'kornia'\nprinted\nto stderr\n"


def test_main_end_to_end_with_missing_video_proxy(comfy, monkeypatch, tmp_path, capfd):
    import logging

    import tiny_models

    monkeypatch.setenv("ELASTIC_TOKENS_VIDEO_PROXY_WEIGHTS", str(tmp_path / "missing.safetensors"))
    monkeypatch.delenv(run_example.PROMPT_TIMEOUT_ENV, raising=False)
    write = tiny_models.write_example_models

    calls = []

    def first_run_write(*args, **kwargs):  # on a fresh machine the first call imports ComfyUI in-process
        if not calls:
            logging.warning("IMPORT FAILED: nodes_canny.py (in-process)")
            print("Total VRAM 0 MB (in-process)")
        calls.append(1)
        return write(*args, **kwargs)

    monkeypatch.setattr(tiny_models, "write_example_models", first_run_write)
    assert run_example.main(["--batch", "2", "--steps", "2", "--no-dynamic", "--out", str(tmp_path)]) == 0
    out, err = capfd.readouterr()  # what reached the terminal, subprocesses included
    text = out + err
    assert "TRAINED PROXIES" in text and "video proxy: SKIPPED" in text and "Main job done" in text
    # progress: one line per prompt with the sampler's steps; no time limit unless asked for
    assert "per-prompt time limit: none" in text
    for i, name in enumerate(["warm-up", "baseline", "accelerated", "adapter", "router", "merge"], start=1):
        assert re.search(rf"\[{i}/6\] {name} +.*done: {1 if i == 1 else 2}/{1 if i == 1 else 2} steps", text), name
    assert re.search(r"router .*Elastic Token Router: \d+% of image tokens skipped", text)
    assert re.search(r"merge .*Token Merge: 50% of image tokens merged away on \d+/2 steps", text)
    # ComfyUI's own output goes to the log file the job names, not to the terminal
    log = tmp_path / run_example.SERVER_LOG_NAME
    assert log.is_file() and "Import times for custom nodes" in log.read_text(errors="replace")
    assert str(log) in text and text.count(str(log)) >= 2  # at the start and at the end
    assert "Import times for custom nodes" not in text and "Starting server" not in text
    assert "in-process" not in text and "IMPORT FAILED: nodes_canny.py (in-process)" in log.read_text()
    assert (tmp_path / "image_proxy_grid.png").is_file() and (tmp_path / "image_proxy_schedule.png").is_file()
    assert not (tmp_path / "video_proxy_grid.png").exists()
    summary = json.loads((tmp_path / "main_job.json").read_text())
    assert summary["skipped"] and [r["runs"][1]["schedule"]["factors"] for r in summary["results"]] == [[1, 2]]
    assert [r["name"] for r in summary["results"][0]["runs"]][-2:] == ["router", "merge"]
    assert summary["results"][0]["runs"][-2]["log_line"].startswith("Elastic Token Router: 2/2 steps")
    assert summary["results"][0]["runs"][-1]["log_line"].startswith("Token Merge: 2/2 steps")
