"""The main job: run the example workflows in a real headless ComfyUI, plain vs. Dynamic Patch Schedule.

``python bench/run_example.py [--models proxy|tiny] [--workflow ...] [--seed N] [--out DIR] ...``
(``bash scripts/main.sh`` installs the runtime first and then runs this).

Models (``--models``):

* ``proxy`` (default) -- the TRAINED proxy models of benchmarks/proxy (Fashion-MNIST; the image
  proxy is ComfyUI's Flux class, the video proxy its Wan class), through the proxy workflows
  ``benchmarks/proxy/workflows/*.json`` and the proxy nodes of
  ``benchmarks/proxy/custom_nodes/elastic_tokens_proxy`` (Load Proxy Model -> Dynamic Patch
  Schedule -> KSampler -> Proxy Decode -> SaveImage), which the server loads through
  ``--extra-model-paths-config benchmarks/proxy/comfyui_extra_paths.yaml``. ``--workflow image``,
  ``video`` or ``both``; the video workflow is skipped with a message while
  ``benchmarks/proxy/video_proxy.safetensors`` does not exist. One prompt per setting samples a
  batch (default: image 10 = every class once, video 5), batch item ``i`` = class ``i % 10``.
  The proxy workflows hold a Load Patch Adapter node (the trained adapters of
  ``benchmarks/proxy/adapters``, found through the same extra-paths file), so a fourth run,
  **adapter**, repeats the accelerated schedule with it. Writes ``out/<key>_proxy_grid.png``
  (rows baseline / accelerated / adapter / dynamic, one column per batch
  item, labelled) and ``out/<key>_proxy_schedule.png`` (patch-size factor and image tokens per step,
  one line per setting, from the ``Proxy schedule: {...}`` line the proxy loader's sampling wrapper
  logs after each run).
* ``tiny`` -- the tiny RANDOM-weight stand-ins of FLUX.1-dev / Wan 2.1 1.3B from
  ``tests/support/tiny_models.py`` under the example workflows' file names (``workflows/*.json``,
  ``--workflow flux``, ``wan`` or ``both``): only shows the pipeline working; writes
  ``out/<key>_side_by_side.png``.

Each workflow (UI format, converted with ``bench/workflow_api.py`` against the live server's
``/object_info``) runs on ComfyUI's real ``main.py`` (``tests/support/comfy_server.py``) on the same
seed as:

* **baseline**    -- the pack's node bypassed (mode 4, as Ctrl+B in the UI): the plain model;
* **accelerated** -- the node with a forced schedule standing for the speed setting
  (tiny models: ``1x6,2x22`` at 28 steps; proxies: ``1x4,2x20,1x4``), training-free;
* **adapter**     -- (proxies) the same forced schedule with the trained patch adapter;
* **dynamic**     -- the node at the workflow's own settings (automatic schedule; with the
  adapter where the workflow has one), unless ``--no-dynamic``;
* **router**      -- (image proxy) the schedule node and the adapter bypassed, an **Elastic Token
  Router** at budget 0.5 (its other inputs at their defaults) between the loader and the sampler,
  unless ``--no-router``: its row in the grid, its line in the plot (image tokens per step) and
  its log line ("Elastic Token Router: N% of image tokens skipped, ~Nx (budget 0.5, ...)");
* **merge**       -- (image proxy) the same with a **Token Merge** node at ratio 0.5 (its other inputs
  at their defaults: window 0-0.8, spread, proportional attention) instead of the router, unless
  ``--no-merge``: its grid row, plot line and log line ("... 50% of image tokens merged away on
  22/28 steps").

A warm-up prompt first loads every model, so the timed prompts only re-run the sampler, the decode
and the save node (ComfyUI caches the loaders and prompts). Per run it reports the prompt's wall
time (history status timestamps), the KSampler time (timestamps of the server's ``executing``
websocket events), the node's own log line (schedule, FLOPs skipped, "sampling took"), the
speed-up and PSNR / SSIM of the decoded output against the baseline (``bench/image_metrics.py``).
CPU timings of small models say nothing about GPU speed on the real models (see BENCHMARKS.md).

While it runs it prints one line per prompt with the sampler's step as ComfyUI's websocket
``progress`` events report it (rewritten in place on a terminal, appended to every 10 s in a log).
There is no time limit per prompt unless ``--timeout SECONDS`` or ``$ELASTIC_TOKENS_PROMPT_TIMEOUT``
sets one; a prompt that runs past it stops the job with a message saying how to raise it. ComfyUI's
own output (its import messages and warnings) goes to ``<out>/comfyui_server.log``, not the terminal;
the job prints that path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import math
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Not the repo root on sys.path: the pack's own `nodes/` would shadow ComfyUI's `nodes` module.
for _p in (REPO / "bench", REPO / "tests" / "support"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import image_metrics  # noqa: E402
import numpy as np  # noqa: E402
import workflow_api  # noqa: E402

PACK_NODE = "ElasticTokensDynamicPatchSchedule"
ADAPTER_NODE = "ElasticTokensLoadPatchAdapter"
ROUTER_NODE = "ElasticTokensTokenRouter"
ROUTER_BUDGET = 0.5  # the router row's budget (share of image tokens computed on a routed step)
MERGE_NODE = "ElasticTokensTokenMerge"
MERGE_RATIO = 0.5  # the merge row's ratio (share of image tokens merged away on a merged step)
OUT_DIR = REPO / "out"
LOG_PREFIX = "Dynamic Patch Schedule:"
# the run's log line starts with the names of the pack's nodes that ran, stacked: "A + B: 28/28 steps"
LOG_LINE = re.compile(r"^(Dynamic Patch Schedule|Elastic Token Router|Token Merge)( \+ [A-Za-z ]+)?: \d+/\d+ steps")
ROUTER_NOTE = re.compile(r"Elastic Token Router: \d+% of image tokens skipped[^;]*")
MERGE_NOTE = re.compile(r"\d+% of image tokens merged away on \d+/\d+ steps")
PROXY_LOG_PREFIX = "Proxy schedule:"  # benchmarks/proxy/custom_nodes/elastic_tokens_proxy
PROXY_DIR = REPO / "benchmarks" / "proxy"
PROXY_PATHS_YAML = PROXY_DIR / "comfyui_extra_paths.yaml"
PROMPT_TIMEOUT_ENV = "ELASTIC_TOKENS_PROMPT_TIMEOUT"  # seconds per prompt; unset / 0 = no limit
SERVER_LOG_NAME = "comfyui_server.log"  # ComfyUI's own output, in --out
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy


# =========================================================================== what to run


@dataclass
class Case:
    """One example workflow at the size/steps the main job runs it."""

    key: str                 # "flux" / "wan" (tiny models) or "image" / "video" (trained proxies)
    title: str
    workflow: Path
    latent_node: str         # node type holding the size
    width: int
    height: int
    steps: int
    seed: int
    schedule: str            # forced schedule of the accelerated run
    frames: int | None = None  # video length (the latent node's "length")
    save_overrides: dict = field(default_factory=dict)
    batch: int = 1           # latent batch size (proxy: batch item i = class i % 10)
    proxy: bool = False      # a trained proxy workflow (grid + schedule plot) rather than a tiny model
    item_frames: int = 1     # decoded frames per batch item (video proxy: 9)
    item_labels: list = field(default_factory=list)  # grid column labels (class names)
    model_note: str = "tiny random-weight model, CPU"
    use_adapter: bool = True  # run the workflow's Load Patch Adapter node (if it has one) in an extra row
    router: bool = False      # an extra row: the Elastic Token Router at ROUTER_BUDGET instead of the schedule
    merge: bool = False       # an extra row: Token Merge at MERGE_RATIO instead of the schedule

    def size_text(self) -> str:
        text = f"{self.width}x{self.height} px" + (" latent size" if self.proxy else "")
        if self.frames:
            text += f", {self.frames} frames" + (f" ({self.item_frames} decoded)" if self.proxy else "")
        if self.batch > 1:
            text += f", batch {self.batch}"
        return f"{text}, {self.steps} steps, seed {self.seed}"


def speed_schedule(steps: int, coarse_fraction: float = 0.8) -> str:
    """The speed setting as a forced schedule: native warm-up steps, then the rest at 2p.

    ``speed_schedule(28) == "1x6,2x22"`` (22/28 = 79% of the steps at 2p).
    """
    coarse = min(steps - 1, max(1, round(coarse_fraction * steps)))
    return f"1x{steps - coarse},2x{coarse}"


def proxy_schedule(steps: int) -> str:
    """The proxies' speed setting: 4 native steps, 2p, then 4 native steps to finish the detail.

    ``proxy_schedule(28) == "1x4,2x20,1x4"``: 2.21x fewer token-FLOPs on the image proxy, the
    setting BENCHMARKS.md measures with and without the trained patch adapter (ending on coarse
    steps, as "1x6,2x22" does, loses far more quality there).
    """
    if steps < 16:
        return speed_schedule(steps)
    return f"1x4,2x{steps - 8},1x4"


def _load_proxy_module(name: str):
    """benchmarks/proxy/<name>.py (image_provider / video_provider), imported once."""
    import importlib.util

    mod_name = f"_et_main_{name}"
    if mod_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(mod_name, PROXY_DIR / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[mod_name]


PROXY_CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                     "Bag", "Ankle boot"]  # train_image_proxy.CLASS_NAMES (checked in the tests)


def proxy_weights(key: str) -> Path:
    """Where the proxy nodes will look for the ``key`` ("image" / "video") proxy's weights."""
    return _load_proxy_module(f"{key}_provider").weights_path()


def make_case(key: str, *, width=None, height=None, steps=None, frames=None, seed=None,
              schedule=None, batch=None) -> Case:
    """The main job's settings for ``key``; any argument overrides one of them.

    Tiny models ("flux" / "wan"): FLUX 512x512, 28 steps; Wan 256x256, 17 frames, 30 steps (the
    workflows' step counts and seed 42). Measured on a quiet 2-core CPU with the tiny models: about
    35 s per workflow, most of it the VAE decodes (FLUX's VAE is full size); smaller sizes leave too
    few tokens for the patch size to matter next to per-step overhead.

    Trained proxies ("image" / "video"), the settings they were trained and sampled at: image
    256x256 latent size (16x32x32 latent, 128x128 images), 28 steps, batch 10 (every class once);
    video 128x128 latent size, length 33 (16x9x16x16 latent, 9 frames of 64x64), 30 steps, batch 5.
    Both cfg 3, euler / simple, seed 42 (the proxy workflows' own values).
    """
    if key == "flux":
        case = Case("flux", "FLUX.1-dev text-to-image", REPO / "workflows" / "flux1_dev_dynamic_patch_t2i.json",
                    "EmptySD3LatentImage", width or 512, height or 512, steps or 28,
                    42 if seed is None else seed, "")
    elif key == "wan":
        case = Case("wan", "Wan 2.1 1.3B text-to-video", REPO / "workflows" / "wan21_t2v_1.3b_dynamic_patch.json",
                    "EmptyHunyuanLatentVideo", width or 256, height or 256, steps or 30,
                    42 if seed is None else seed, "", frames=frames or 17,
                    # lossless frames: the metrics compare the model's outputs, not WEBP artefacts
                    save_overrides={"lossless": True})
    elif key == "image":
        case = Case("image", "Image proxy (ComfyUI Flux class, trained on Fashion-MNIST)",
                    PROXY_DIR / "workflows" / "image_proxy_dynamic_patch.json", "EmptySD3LatentImage",
                    width or 256, height or 256, steps or 28, 42 if seed is None else seed, "",
                    batch=batch or 10, proxy=True, model_note="trained image proxy, CPU", router=True,
                    merge=True)
    elif key == "video":
        case = Case("video", "Video proxy (ComfyUI Wan 2.1 class, trained on Fashion-MNIST clips)",
                    PROXY_DIR / "workflows" / "video_proxy_dynamic_patch.json", "EmptyHunyuanLatentVideo",
                    width or 128, height or 128, steps or 30, 42 if seed is None else seed, "",
                    frames=frames or 33, batch=batch or 5, proxy=True, model_note="trained video proxy, CPU")
        case.item_frames = (case.frames - 1) // 4 + 1  # one decoded frame per latent frame
    else:
        raise ValueError(f"unknown workflow {key!r} (flux, wan, image or video)")
    if case.proxy:
        case.item_labels = [f"{PROXY_CLASS_NAMES[i % 10]} (item {i})" for i in range(case.batch)]
    case.schedule = schedule or (proxy_schedule(case.steps) if case.proxy else speed_schedule(case.steps))
    return case


# =========================================================================== talking to the server


class EventRecorder:
    """Timestamps the server's websocket events for one client id (``/ws?clientId=...``).

    ComfyUI sends ``executing {node}`` when a node starts and ``executing {node: None}`` when the
    prompt is done, so the time between a node's event and the next one is that node's run time.
    """

    def __init__(self, url: str):
        self.client_id = uuid.uuid4().hex
        self.ws_url = url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        self.events: list[tuple[float, str, dict]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, timeout: float = 10.0) -> "EventRecorder":
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"websocket {self.ws_url} did not connect: {self._error}")
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._listen())
        except BaseException as exc:  # noqa: BLE001  (reported through start()/events)
            self._error = exc
            self._ready.set()

    async def _listen(self) -> None:
        import aiohttp

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with aiohttp.ClientSession(trust_env=False) as session:
            async with session.ws_connect(self.ws_url, heartbeat=30, max_msg_size=0) as ws:
                self._ready.set()
                reader = asyncio.ensure_future(self._read(ws))
                await self._stop.wait()
                reader.cancel()

    async def _read(self, ws) -> None:
        import aiohttp

        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    continue
                with self._lock:
                    self.events.append((time.monotonic(), data.get("type", ""), data.get("data") or {}))
            elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                break

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    def progress(self, prompt_id: str, node: str | None = None) -> tuple[int, int] | None:
        """The latest ``progress`` event of ``prompt_id`` (of ``node`` if given) as (step, steps).

        ComfyUI sends one per sampling step (``{"value", "max", "prompt_id", "node"}``) to the
        client that queued the prompt."""
        with self._lock:
            for _, kind, d in reversed(self.events):
                if (kind == "progress" and d.get("prompt_id") == prompt_id
                        and (node is None or str(d.get("node")) == node)):
                    return int(d.get("value") or 0), int(d.get("max") or 0)
        return None

    def node_seconds(self, prompt_id: str, timeout: float = 5.0) -> dict[str, float]:
        """Seconds each executed node of ``prompt_id`` took ({node id: s}); {} if unknown."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                ex = [(t, d.get("node")) for t, kind, d in self.events
                      if kind == "executing" and d.get("prompt_id") == prompt_id]
            if (ex and ex[-1][1] is None) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if not ex or ex[-1][1] is not None:
            return {}
        return {str(node): t_next - t for (t, node), (t_next, _) in zip(ex, ex[1:]) if node is not None}


def queue_prompt(server, prompt: dict, client_id: str) -> str:
    """POST /prompt with our websocket's client id; HTTP 400 -> ComfyError, like ComfyServer.queue."""
    from comfy_server import ComfyError

    body = json.dumps({"prompt": prompt, "client_id": client_id}).encode()
    req = urllib.request.Request(server.url + "/prompt", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with _HTTP.open(req, timeout=60) as resp:
            return json.loads(resp.read())["prompt_id"]
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        raise ComfyError(f"prompt rejected (HTTP {e.code}): {text}", text) from None


def _status_seconds(entry: dict) -> float | None:
    """execution_start -> execution_success, from the history entry's status timestamps (ms)."""
    stamps = {kind: data.get("timestamp") for kind, data in (entry.get("status") or {}).get("messages", [])}
    start, end = stamps.get("execution_start"), stamps.get("execution_success")
    return (end - start) / 1000.0 if start is not None and end is not None else None


def _schedule_lines(server) -> list[str]:
    return [line.strip() for line in server.log_text().splitlines() if LOG_LINE.match(line)]


def parse_schedule_line(line: str) -> dict:
    """The numbers of one "Dynamic Patch Schedule: ..." log line, read by the pack's own parser
    (runtime/report.py; empty dict if it does not parse)."""
    import comfy_runtime

    comfy_runtime.load_pack()  # imports no ComfyUI
    from elastic_tokens.runtime.report import parse_summary

    return parse_summary(line)


def _proxy_lines(server) -> list[str]:
    return [line.strip() for line in server.log_text().splitlines() if line.startswith(PROXY_LOG_PREFIX)]


def parse_proxy_line(line: str) -> dict:
    """The per-step schedule of one ``Proxy schedule: {json}`` line (the proxy loader's wrapper):
    ``{"source", "steps", "latent", "factors": [1, 2, ...], "tokens": [256, 64, ...]}``."""
    return json.loads(line.split(PROXY_LOG_PREFIX, 1)[1])


def run_length(factors) -> str:
    """[1, 1, 2, 2, 2] -> "1x2,2x3" (the forced-schedule syntax; 0 = a step never evaluated)."""
    import comfy_runtime

    comfy_runtime.load_pack()  # imports no ComfyUI
    from elastic_tokens.ideas.patch.config import format_schedule

    return format_schedule(factors)


# =========================================================================== progress and time limit


class PromptTimeout(RuntimeError):
    """A prompt ran past the per-prompt limit the user set (--timeout / ELASTIC_TOKENS_PROMPT_TIMEOUT)."""


def prompt_timeout(value=None) -> float | None:
    """The per-prompt time limit in seconds: ``value`` (the --timeout flag) if given, else
    $ELASTIC_TOKENS_PROMPT_TIMEOUT; ``None`` (no limit, the default) when unset or <= 0."""
    if value is None:
        text = os.environ.get(PROMPT_TIMEOUT_ENV, "").strip()
        if not text:
            return None
        try:
            value = float(text)
        except ValueError:
            raise SystemExit(f"{PROMPT_TIMEOUT_ENV}={text!r} is not a number of seconds (0 = no limit)") from None
    return float(value) if value and value > 0 else None


def timeout_message(name: str, limit: float, log_path=None) -> str:
    text = (f"{name}: the prompt did not finish within {limit:.0f} s, the per-prompt time limit set with "
            f"--timeout or {PROMPT_TIMEOUT_ENV}. A slow or busy CPU can need more: raise it "
            f"(e.g. --timeout {100 * math.ceil(max(600.0, 4 * limit) / 100):.0f}), or remove it (--timeout 0, "
            f"the default: no limit).")
    if log_path is not None:
        text += f" ComfyUI's own log: {log_path}"
    return text


class PromptProgress:
    """One compact line per prompt with its sampling step, from ComfyUI's ``progress`` events.

    On a terminal the line is rewritten in place (``   [2/5] baseline      step 14/28    9 s``); in
    a log or pipe (no tty) the step reached is appended to the line every ``every`` seconds, so a
    CI log shows it advancing without one line per step. ``finish`` ends the line.
    """

    def __init__(self, label: str, stream=None, every: float = 10.0):
        self.stream = stream if stream is not None else sys.stdout
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.label, self.every = label, every
        self.t0 = self._shown_at = time.monotonic()
        self.step: tuple[int, int] | None = None
        self._shown: tuple[int, int] | None = None
        self._write(label if not self.tty else self._line("starting"))

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _line(self, state: str) -> str:
        return f"\r{self.label}  {state:<16}{time.monotonic() - self.t0:6.0f} s\x1b[K"

    def _state(self) -> str:
        return f"step {self.step[0]}/{self.step[1]}" if self.step else "starting"

    def update(self, step: tuple[int, int] | None) -> None:
        if step is not None:
            self.step = step
        now = time.monotonic()
        if self.tty:
            if self.step != self._shown or now - self._shown_at >= 1.0:
                self._write(self._line(self._state()))
                self._shown, self._shown_at = self.step, now
        elif now - self._shown_at >= self.every and (self.step != self._shown or now - self._shown_at >= 3 * self.every):
            self._write(f" {self._state()} ({now - self.t0:.0f} s),")
            self._shown, self._shown_at = self.step, now

    def finish(self, text: str) -> None:
        self._write(f"\r{self.label}  {text}\x1b[K\n" if self.tty else f" {text}\n")


# =========================================================================== one run


@dataclass
class RunResult:
    name: str
    description: str
    prompt_s: float                 # execution_start -> execution_success (server clock)
    sampler_s: float                # KSampler node time (websocket events), else prompt_s
    sampler_source: str             # "KSampler events" / "prompt wall time"
    files: list[Path]
    frames: object = None           # (frames, H, W, 3) float array of the decoded output
    log_line: str | None = None
    log: dict = field(default_factory=dict)
    schedule: dict = field(default_factory=dict)  # proxy runs: per-step factors and tokens
    psnr: float | None = None
    ssim: float | None = None
    speedup: float | None = None    # baseline sampler_s / this sampler_s
    prompt_speedup: float | None = None

    def as_json(self) -> dict:
        return {"name": self.name, "description": self.description, "prompt_s": self.prompt_s,
                "sampler_s": self.sampler_s, "sampler_source": self.sampler_source,
                "files": [str(f) for f in self.files], "log_line": self.log_line, "log": self.log,
                "schedule": self.schedule,
                "psnr_db": _json_num(self.psnr), "ssim": self.ssim, "speedup": self.speedup,
                "prompt_speedup": self.prompt_speedup}


def _json_num(x):
    return "inf" if isinstance(x, float) and math.isinf(x) else x


def build_prompt(case: Case, object_info: dict, *, node: str, steps=None, size=None, prefix: str,
                 adapter: bool = False) -> dict:
    """API prompt of ``case``: node = "bypass" | "forced" | "dynamic" | "router" | "merge"; size/steps for the
    warm-up.

    ``adapter``: keep the workflow's Load Patch Adapter node (if any) active; otherwise it is
    bypassed like the schedule node, so "forced" alone is the training-free coarse schedule.
    "router": the schedule node bypassed and an Elastic Token Router (:data:`ROUTER_BUDGET`, its
    other inputs at the node's defaults) put in front of the sampler's MODEL input; "merge": the same
    with a Token Merge node (:data:`MERGE_RATIO`, its other inputs at the node's defaults)."""
    wf = json.loads(case.workflow.read_text(encoding="utf-8"))
    for n in wf["nodes"]:
        if n["type"] == ADAPTER_NODE and (node == "bypass" or not adapter):
            n["mode"] = 4
    width, height = size or (case.width, case.height)
    latent = {"width": width, "height": height, "batch_size": case.batch if size is None else 1}
    if case.frames:
        latent["length"] = case.frames if size is None else 1
    save_type = next(n["type"] for n in wf["nodes"] if n["type"].startswith("Save"))
    overrides = {case.latent_node: latent,
                 "KSampler": {"seed": case.seed, "steps": steps or case.steps},
                 save_type: {"filename_prefix": prefix, **case.save_overrides}}
    if node in ("bypass", "router", "merge"):
        for n in wf["nodes"]:
            if n["type"] == PACK_NODE:
                n["mode"] = 4
    else:
        names = {name for name, *_ in workflow_api._input_defs(object_info[PACK_NODE])}
        pack = {"forced_schedule": case.schedule if node == "forced" else ""}
        if "cuda_graphs" in names:
            pack["cuda_graphs"] = False
        overrides[PACK_NODE] = pack
    problems = workflow_api.validate(wf, object_info)
    if problems:
        raise workflow_api.WorkflowError(f"{case.workflow.name}: " + "; ".join(problems))
    prompt = workflow_api.ui_to_api(wf, object_info, overrides=overrides)
    has_node = any(e["class_type"] == PACK_NODE for e in prompt.values())
    assert has_node == (node not in ("bypass", "router", "merge")), "the schedule node runs iff node is forced/dynamic"
    if node in ("router", "merge"):
        class_type, title, setting = {"router": (ROUTER_NODE, "Elastic Token Router", {"budget": ROUTER_BUDGET}),
                                      "merge": (MERGE_NODE, "Token Merge", {"ratio": MERGE_RATIO})}[node]
        sampler = next(e for e in prompt.values() if e["class_type"] == "KSampler")
        inputs = {name: opts["default"] for name, _kind, opts, _req in workflow_api._input_defs(object_info[class_type])
                  if "default" in opts}
        inputs.update(model=sampler["inputs"]["model"], **setting)
        rid = str(max(int(k) for k in prompt if k.isdigit()) + 1)
        prompt[rid] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
        sampler["inputs"]["model"] = [rid, 0]
    return prompt


def run_prompt(server, recorder: EventRecorder | None, prompt: dict, name: str, description: str,
               expect_log: bool, timeout: float | None = None, expect_proxy: bool = False,
               progress: str | None = None) -> RunResult:
    """Queue ``prompt``, wait for it (``timeout`` seconds at most; None = no limit) and read its outputs.

    ``progress``: the label of a :class:`PromptProgress` line showing the sampler's step (None = quiet)."""
    before = len(_schedule_lines(server))
    proxy_before = len(_proxy_lines(server))
    sampler_id = next(nid for nid, e in prompt.items() if e["class_type"] == "KSampler")
    if recorder is not None:
        prompt_id = queue_prompt(server, prompt, recorder.client_id)
    else:
        prompt_id = server.queue(prompt)
    line_out = PromptProgress(progress) if progress is not None else None
    t0 = time.monotonic()

    def poll():
        if line_out is not None:
            line_out.update(recorder.progress(prompt_id, sampler_id) if recorder is not None else None)
        if timeout is not None and time.monotonic() - t0 > timeout:
            if line_out is not None:
                line_out.finish(f"stopped after {time.monotonic() - t0:.0f} s")
            raise PromptTimeout(timeout_message(name, timeout, getattr(server, "log_path", None)))

    try:
        entry = server.wait(prompt_id, timeout=None, on_poll=poll)
    except PromptTimeout:
        raise
    except BaseException:
        if line_out is not None:
            line_out.finish("failed")
        raise
    prompt_s = _status_seconds(entry)
    node_s = recorder.node_seconds(prompt_id) if recorder is not None else {}
    if line_out is not None:
        step = (recorder.progress(prompt_id, sampler_id) if recorder is not None else None) or line_out.step
        steps = f"{step[0]}/{step[1]} steps, " if step else ""
        sampler = f"sampler {node_s[sampler_id]:.1f} s, " if sampler_id in node_s else ""
        line_out.finish(f"done: {steps}{sampler}prompt {prompt_s if prompt_s is not None else time.monotonic() - t0:.1f} s")
    if prompt_s is None:
        raise RuntimeError(f"{name}: the history entry has no execution_start/success timestamps")
    if sampler_id in node_s:
        sampler_s, source = node_s[sampler_id], "KSampler events"
    else:
        sampler_s, source = prompt_s, "prompt wall time"
    line = None
    if expect_log:
        deadline = time.monotonic() + 10  # the log line may trail the history entry a moment
        while not (new := _schedule_lines(server)[before:]) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not new:
            raise RuntimeError(f"{name}: the node logged no '{LOG_PREFIX}' line:\n{server.log_text()[-3000:]}")
        line = new[-1]
    schedule = {}
    if expect_proxy:  # logged after the sampler (outermost wrapper), before the history entry
        deadline = time.monotonic() + 10
        while not (new := _proxy_lines(server)[proxy_before:]) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not new:
            raise RuntimeError(f"{name}: the proxy loader logged no '{PROXY_LOG_PREFIX}' line:\n"
                               f"{server.log_text()[-3000:]}")
        schedule = parse_proxy_line(new[-1])
    files = server.output_files(entry)
    if not files or not all(f.is_file() for f in files):
        raise RuntimeError(f"{name}: no output files in {entry.get('outputs')}")
    # one file per image (SaveImage with a batch) or one animated file: every frame, in order
    frames = np.concatenate([image_metrics.load_frames(f) for f in files])
    return RunResult(name, description, prompt_s, sampler_s, source, files, frames, line,
                     parse_schedule_line(line) if line else {}, schedule)


# =========================================================================== side by side


def side_by_side(left, right, labels: tuple[str, str], path: Path, title: str = "",
                 max_rows: int = 3, min_side: int = 256) -> Path:
    """Write ``left | right`` (frames arrays) as one labelled PNG; a video shows first/middle/last frames."""
    import numpy as np
    from PIL import Image, ImageDraw

    n = len(left)
    rows = sorted({0, n // 2, n - 1})[:max_rows] if n > 1 else [0]
    h, w = left.shape[1:3]
    scale = max(1, -(-min_side // max(h, w)))  # small outputs are scaled up (nearest) to be visible
    cw, ch = w * scale, h * scale
    gap, head = 8, 28
    canvas = Image.new("RGB", (2 * cw + 3 * gap, head + (title != "") * 20 + len(rows) * (ch + gap) + gap),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y0 = gap
    if title:
        draw.text((gap, y0), title, fill=(0, 0, 0))
        y0 += 20
    for col, label in enumerate(labels):
        draw.text((gap + col * (cw + gap), y0), label, fill=(0, 0, 0))
    y0 += head - gap
    for r, idx in enumerate(rows):
        for col, frames in enumerate((left, right)):
            tile = Image.fromarray(np.clip(frames[idx], 0, 255).astype(np.uint8))
            if scale > 1:
                tile = tile.resize((cw, ch), Image.NEAREST)
            canvas.paste(tile, (gap + col * (cw + gap), y0 + r * (ch + gap)))
        if n > 1:
            draw.text((2 * cw + 2 * gap - 60, y0 + r * (ch + gap) + 2), f"frame {idx}", fill=(255, 255, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# =========================================================================== proxy grid and schedule plot

GRID_GAP = 6
GRID_LABEL_W = 230   # left column: setting, times, metrics
GRID_HEAD_H = 24     # a column label row
GRID_TITLE_H = 62    # three title lines
GRID_MIN_W = 660     # room for the title lines


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except TypeError:
        return ImageFont.load_default()


def item_tiles(frames, item_frames: int) -> list:
    """(N, H, W, 3) decoded frames -> one uint8 tile per batch item (a video clip = frame mosaic)."""
    n = len(frames) // item_frames
    cols = math.ceil(math.sqrt(item_frames))
    rows = math.ceil(item_frames / cols)
    tiles = []
    for i in range(n):
        clip = np.clip(frames[i * item_frames:(i + 1) * item_frames], 0, 255).astype(np.uint8)
        if item_frames == 1:
            tiles.append(clip[0])
            continue
        h, w = clip.shape[1:3]
        tile = np.full((rows * h, cols * w, 3), 255, np.uint8)
        for f, img in enumerate(clip):
            tile[(f // cols) * h:(f // cols + 1) * h, (f % cols) * w:(f % cols + 1) * w] = img
        tiles.append(tile)
    return tiles


def grid_size(rows: int, cols: int, cell_w: int, cell_h: int) -> tuple[int, int]:
    """(width, height) of :func:`sample_grid`'s PNG."""
    return (max(GRID_MIN_W, GRID_LABEL_W + cols * (cell_w + GRID_GAP) + GRID_GAP),
            GRID_TITLE_H + GRID_HEAD_H + rows * (cell_h + GRID_GAP) + GRID_GAP)


def sample_grid(case: Case, runs: list, path: Path) -> Path:
    """Rows = settings (baseline first), columns = batch items (classes); labelled PNG.

    Each row label gives the setting, its KSampler time, speed-up and PSNR/SSIM against the
    baseline; each non-baseline cell shows its own PSNR against the baseline's cell.
    """
    from PIL import Image, ImageDraw

    tiles = [item_tiles(r.frames, case.item_frames) for r in runs]
    cols = len(tiles[0])
    ch, cw = tiles[0][0].shape[:2]
    canvas = Image.new("RGB", grid_size(len(runs), cols, cw, ch), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    big, small = _font(15), _font(12)
    draw.text((GRID_GAP, 4), case.title, fill=(0, 0, 0), font=big)
    extra = [n for n, on in (("Elastic Token Router", case.router), ("Token Merge", case.merge)) if on]
    draw.text((GRID_GAP, 24), f"baseline vs. Dynamic Patch Schedule{''.join(', ' + n for n in extra)}, "
              f"same seed; {case.size_text()}",
              fill=(60, 60, 60), font=small)
    draw.text((GRID_GAP, 40), f"{case.model_note}; yellow = the cell's PSNR to the baseline's cell "
              f"(batch item i = class i % 10)", fill=(60, 60, 60), font=small)
    y0 = GRID_TITLE_H
    labels = case.item_labels or [f"item {i}" for i in range(cols)]
    for c in range(cols):
        draw.text((GRID_LABEL_W + c * (cw + GRID_GAP), y0 + 6), labels[c].split(" (item")[0], fill=(0, 0, 0), font=small)
    y0 += GRID_HEAD_H
    base_tiles = tiles[0]
    for r, (run, row) in enumerate(zip(runs, tiles)):
        y = y0 + r * (ch + GRID_GAP)
        sched = run.schedule.get("factors")
        lines = [run.name, f"sampler {run.sampler_s:.2f} s ({_fmt(run.speedup, '.2f')}x)"]
        if run.name == "baseline":
            lines.append("node bypassed")
        else:
            lines.append(f"PSNR {_fmt(run.psnr, '.1f')} dB, SSIM {_fmt(run.ssim, '.3f')}")
            if run.log:
                lines.append(f"{run.log['flops_skipped_pct']:.0f}% FLOPs skipped"
                             + (f", {run.log['tokens_skipped_pct']:.0f}% tokens" if run.log.get("tokens_skipped_pct") else ""))
        if sched:
            rle = run_length(sched)
            lines.append(f"schedule {rle}" if len(rle) <= 22 or not run.log else run.log["parts"])
        for i, text in enumerate(lines):
            draw.text((GRID_GAP, y + 4 + 17 * i), text, fill=(0, 0, 0), font=big if i == 0 else small)
        for c, tile in enumerate(row):
            x = GRID_LABEL_W + c * (cw + GRID_GAP)
            canvas.paste(Image.fromarray(tile), (x, y))
            if r > 0:
                value = image_metrics.psnr(base_tiles[c].astype(np.float64), tile.astype(np.float64))
                text = "= baseline" if math.isinf(value) else f"{value:.1f} dB"
                box = draw.textbbox((x + 3, y + ch - 16), text, font=small)
                draw.rectangle(box, fill=(0, 0, 0))
                draw.text((x + 3, y + ch - 16), text, fill=(255, 230, 0), font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


RUN_STYLE = {"baseline": dict(color="#555555", lw=4.0, ls="-", alpha=0.5),
             "accelerated": dict(color="#d62728", lw=2.0, ls="-", marker="o", ms=4),
             "adapter": dict(color="#2ca02c", lw=1.5, ls=":", marker="s", ms=3),
             "dynamic": dict(color="#1f77b4", lw=1.5, ls="--", marker="x", ms=5),
             "router": dict(color="#9467bd", lw=1.5, ls="-.", marker="d", ms=4),
             "merge": dict(color="#ff7f0e", lw=1.5, ls=(0, (5, 1, 1, 1)), marker="^", ms=4)}
SCHEDULE_PLOT_PX = (1000, 640)


def schedule_plot(case: Case, runs: list, path: Path) -> Path:
    """Patch-size factor (top) and image tokens per sample (bottom) per step, one line per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    dpi = 100
    fig, (ax_k, ax_t) = plt.subplots(2, 1, sharex=True, figsize=(SCHEDULE_PLOT_PX[0] / dpi, SCHEDULE_PLOT_PX[1] / dpi),
                                     dpi=dpi, gridspec_kw={"height_ratios": [1, 1.3]})
    for run in runs:
        sched = run.schedule
        if not sched.get("factors"):
            continue
        steps = list(range(1, len(sched["factors"]) + 1))
        style = RUN_STYLE.get(run.name, {})
        note = ("node bypassed" if run.name == "baseline" else
                f"{run.log.get('flops_skipped_pct', 0):.0f}% FLOPs skipped, sampler {_fmt(run.speedup, '.2f')}x")
        if run.log.get("tokens_skipped_pct"):
            note += f", {run.log['tokens_skipped_pct']:.0f}% of image tokens {'merged away' if run.name == 'merge' else 'skipped'}"
        label = f"{run.name}: {run_length(sched['factors'])} ({note})"
        ax_k.step(steps, sched["factors"], where="mid", label=label, **style)
        ax_t.step(steps, sched["tokens"], where="mid", label=label, **style)
    ax_k.set_yscale("log", base=2)
    ax_k.set_yticks([1, 2, 4], ["p (native)", "2p", "4p"])
    ax_k.set_ylim(0.8, 5)
    ax_k.set_ylabel("patch size")

    ax_k.grid(alpha=0.3)
    ax_t.set_yscale("log", base=2)
    ax_t.set_ylabel("image tokens per sample")
    ax_t.set_xlabel("sampling step")
    ax_t.grid(alpha=0.3, which="both")
    ax_t.set_xlim(0.5, case.steps + 0.5)
    ax_t.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    tok = sorted({t for r in runs for t in r.schedule.get("tokens", []) if t})
    if tok:
        ax_t.set_yticks(tok, [str(t) for t in tok])
        ax_t.set_ylim(tok[0] / 1.5, tok[-1] * 1.5)
    fig.suptitle(f"{case.title}\nper-step schedule, {case.size_text()}", fontsize=10)
    handles, labels = ax_k.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.925), fontsize=8, ncol=1)
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.08, top=0.8, hspace=0.08)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# =========================================================================== one workflow


@dataclass
class CaseResult:
    case: Case
    runs: list[RunResult]
    side_by_side: Path | None
    grid: Path | None = None            # proxy: sample grid PNG
    schedule_plot: Path | None = None   # proxy: per-step schedule PNG

    def run(self, name: str) -> RunResult:
        return next(r for r in self.runs if r.name == name)

    def as_json(self) -> dict:
        c = self.case
        return {"workflow": c.workflow.name, "width": c.width, "height": c.height, "frames": c.frames,
                "steps": c.steps, "seed": c.seed, "schedule": c.schedule,
                "batch": c.batch, "item_labels": c.item_labels,
                "side_by_side": str(self.side_by_side) if self.side_by_side else None,
                "grid": str(self.grid) if self.grid else None,
                "schedule_plot": str(self.schedule_plot) if self.schedule_plot else None,
                "runs": [r.as_json() for r in self.runs]}


def run_case(server, case: Case, *, object_info: dict | None = None, dynamic: bool = True,
             out_dir: Path | None = OUT_DIR, warmup: bool = True, timeout: float | None = None,
             progress: bool = True, router: bool = True, merge: bool = True) -> CaseResult:
    """Baseline, accelerated (and dynamic, and router / merge where ``case.router`` / ``case.merge``) runs of ``case`` on
    ``server``; metrics against the baseline.

    ``timeout``: seconds per prompt (None = no limit); ``progress``: print a line per prompt with
    the sampler's step as it advances."""
    object_info = object_info or server.object_info()
    tag = uuid.uuid4().hex[:6]
    recorder = None
    try:
        recorder = EventRecorder(server.url).start()
    except Exception as exc:  # noqa: BLE001  (timings then fall back to the prompt wall time)
        print(f"  (no websocket timings: {exc}; sampler time = prompt wall time)")
    try:
        has_adapter = case.use_adapter and any(
            n["type"] == ADAPTER_NODE for n in json.loads(case.workflow.read_text())["nodes"])
        plan = [("baseline", "bypass", "node bypassed (mode 4)", False),
                ("accelerated", "forced", f"forced schedule {case.schedule}, training-free", False)]
        if has_adapter:
            plan.append(("adapter", "forced", f"forced schedule {case.schedule} + trained patch adapter", True))
        if dynamic:
            plan.append(("dynamic", "dynamic", "automatic schedule, workflow settings"
                         + (" + patch adapter" if has_adapter else ""), has_adapter))
        if case.router and router:
            plan.append(("router", "router", f"Elastic Token Router, budget {ROUTER_BUDGET:g} (schedule bypassed)",
                         False))
        if case.merge and merge:
            plan.append(("merge", "merge", f"Token Merge, ratio {MERGE_RATIO:g} (schedule bypassed)", False))
        total = len(plan) + bool(warmup)

        def label(i: int, name: str):
            return f"   [{i}/{total}] {name:<12}" if progress else None

        if progress:
            print(f"-- {case.title}: {total} prompts on the server"
                  + (" (a 1-step warm-up that loads the models, then " if warmup else " (")
                  + f"{', '.join(p[0] for p in plan)}; {case.steps} steps each)", flush=True)
        if warmup:  # loads every model and encodes the prompts; the timed runs reuse ComfyUI's cache
            prompt = build_prompt(case, object_info, node="bypass", steps=1, size=(64, 64),
                                  prefix=f"elastic_tokens/{case.key}_warmup_{tag}")
            run_prompt(server, recorder, prompt, "warm-up", "", expect_log=False, timeout=timeout,
                       progress=label(1, "warm-up"))
        runs = []
        for i, (name, node, description, adapter) in enumerate(plan, start=1 + bool(warmup)):
            prompt = build_prompt(case, object_info, node=node, prefix=f"elastic_tokens/{case.key}_{name}_{tag}",
                                  adapter=adapter)
            runs.append(run_prompt(server, recorder, prompt, name, description,
                                   expect_log=node != "bypass", timeout=timeout, expect_proxy=case.proxy,
                                   progress=label(i, name)))
    finally:
        if recorder is not None:
            recorder.close()
    base = runs[0]
    for r in runs:
        r.psnr = image_metrics.psnr(base.frames, r.frames)
        r.ssim = image_metrics.ssim(base.frames, r.frames)
        r.speedup = base.sampler_s / r.sampler_s if r.sampler_s > 0 else None
        r.prompt_speedup = base.prompt_s / r.prompt_s if r.prompt_s > 0 else None
    path = grid = plot = None
    if out_dir is not None and case.proxy:
        grid = sample_grid(case, runs, Path(out_dir) / f"{case.key}_proxy_grid.png")
        plot = schedule_plot(case, runs, Path(out_dir) / f"{case.key}_proxy_schedule.png")
    elif out_dir is not None:
        acc = runs[1]
        path = side_by_side(
            base.frames, acc.frames,
            (f"baseline (node bypassed): sampler {base.sampler_s:.2f} s",
             f"accelerated {case.schedule}: {acc.sampler_s:.2f} s, PSNR {acc.psnr:.1f} dB, SSIM {acc.ssim:.3f}"),
            Path(out_dir) / f"{case.key}_side_by_side.png",
            title=f"{case.title}, {case.size_text()} -- tiny random-weight model, CPU")
    return CaseResult(case, runs, path, grid, plot)


# =========================================================================== printing


def _fmt(x, spec: str, none: str = "-") -> str:
    if x is None:
        return none
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def report(result: CaseResult) -> str:
    c = result.case
    lines = [f"== {c.title}  ({c.workflow.relative_to(REPO)})",
             f"   {c.size_text()}; speed setting = forced schedule '{c.schedule}'"]
    head = f"   {'run':<12}{'prompt s':>9}{'sampler s':>11}{'speedup':>9}{'PSNR dB':>9}{'SSIM':>8}   schedule (node's log)"
    lines.append(head)
    for r in result.runs:
        if r.log:
            sched = (f"{r.log['parts']}; {r.log['flops_skipped_pct']:.0f}% FLOPs skipped, "
                     f"~{r.log['estimated_speedup']:.2f}x est.; node timed {_fmt(r.log['sampling_s'], '.2f')} s")
            if (note := ROUTER_NOTE.search(r.log_line or "")):
                sched += f"; {note[0]}"
            if (note := MERGE_NOTE.search(r.log_line or "")):
                sched += f"; Token Merge: {note[0]}"
        else:
            sched = r.description + " -- no log line"
        if r.schedule.get("factors"):
            sched += f"; per step {run_length(r.schedule['factors'])}"
        psnr = "(ref)" if r.name == "baseline" else _fmt(r.psnr, ".2f")
        ssim = "(ref)" if r.name == "baseline" else _fmt(r.ssim, ".4f")
        lines.append(f"   {r.name:<12}{r.prompt_s:>9.2f}{r.sampler_s:>11.2f}{_fmt(r.speedup, '.2f'):>8}x"
                     f"{psnr:>9}{ssim:>8}   {sched}")
    src = {r.sampler_source for r in result.runs}
    lines.append(f"   prompt s = execution_start -> execution_success (history); sampler s from {', '.join(sorted(src))}; "
                 f"speedup = baseline sampler s / run's sampler s")
    acc = result.run("accelerated")
    decode = "Proxy Decode" if c.proxy else "VAE decode"
    lines.append(f"   whole prompt (sampler + {decode} + save): accelerated {acc.prompt_speedup:.2f}x the baseline")
    dyn = next((r for r in result.runs if r.name == "dynamic"), None)
    if dyn is not None and dyn.psnr is not None and math.isinf(dyn.psnr):
        lines.append("   dynamic: the automatic criterion kept every step native here, so its output is identical to "
                     "the baseline (PSNR inf, SSIM 1): same seed = same image,\n"
                     "            and as it does the baseline's work, its 'speedup' shows the timing noise")
    if result.side_by_side:
        lines.append(f"   side-by-side: {result.side_by_side}")
    if result.grid:
        lines.append(f"   sample grid ({len(result.runs)} settings x {c.batch} items, batch item i = class i % 10): "
                     f"{result.grid}")
    if result.schedule_plot:
        lines.append(f"   per-step schedule plot (patch size, image tokens): {result.schedule_plot}")
    return "\n".join(lines)


BANNER = """\
Elastic Tokens -- main job: Dynamic Patch Schedule (and, on the image proxy, the Elastic Token Router
and Token Merge) vs. the plain model (nodes bypassed), same seed"""

MODEL_LINES = {
    "tiny": """\
Model: TINY RANDOM-WEIGHT stand-ins for FLUX.1-dev / Wan 2.1 1.3B (--models tiny;
       tests/support/tiny_models.py, under the workflows' file names), not the real checkpoints.""",
    "proxy": """\
Model: the embedded default = the TRAINED PROXIES of benchmarks/proxy (Fashion-MNIST; image: ComfyUI's
       Flux class, 9.3M parameters, 128x128; video: ComfyUI's Wan 2.1 class, 9 frames of 64x64), loaded
       by the proxy nodes (benchmarks/proxy/custom_nodes) in the proxy workflows; not FLUX.1-dev / Wan.""",
}

NOTES = {
    "tiny": """\
Read these numbers for what they are:
 * Random weights: the outputs are noise-like pictures; PSNR/SSIM only show that baseline and
   accelerated runs go through the whole pipeline (load, sample, decode, save) and can be compared
   on the same seed. They say nothing about the quality of the real models.
 * Speed: these are 2-block, 64/128-wide models on a CPU, where per-step overhead weighs far more
   than in the 12B / 1.3B transformers (the node's "~x estimated" counts the tiny model's own FLOPs).
   They are NOT the GPU speed-ups on the real FLUX.1-dev / Wan 2.1; see BENCHMARKS.md for those.""",
    "proxy": """\
Read these numbers for what they are:
 * Quality: PSNR/SSIM compare each setting with the baseline on the same seed and classes (the grid
   shows them). Training-free coarse steps lose to simply running fewer steps at the same cost on
   this proxy; the trained patch adapter (benchmarks/proxy/adapters) closes much of the gap: on the
   image proxy it beats the fewer-steps competitor on FID, not on LPIPS, and an adapter trained for
   2x19,1x9 (strength 1.1) reaches 2.08x fewer token-FLOPs at +1.3% FID (BENCHMARKS.md section 5:
   FID and LPIPS over 2,000 samples on an H100; this job shows the first adapter, which the
   automatic schedule needs).
 * Router: the Elastic Token Router (budget 0.5, training-free: scorer context, fill cache, skipped
   tokens' keys/values attended, routing from 20% of the sampling on, every 5th step dense) on the image proxy; the row shows what it skipped and
   PSNR/SSIM against the baseline. Its quality against fewer steps at n = 2,000 is issue 13's
   benchmark (BENCHMARKS.md), not this job.
 * Merge: Token Merge (ratio 0.5, training-free, the node's defaults: pairs of neighbouring tokens
   merged on the first 80% of the steps, each token keeps its own noise) on the image proxy. On this
   proxy training-free merging loses clearly to simply running fewer steps at the same token-FLOPs
   (BENCHMARKS.md section 10, every step merged: LPIPS 0.26 against 0.02 for 13 plain steps); expect its row to look
   visibly worse. Its speed is real at size (Wan 2.1 1.3B at 0.5: 2.31x on an H200, section 9).
 * Speed: CPU timings of small proxies (9.3M / 7.0M parameters, 256-576 image tokens per sample), where
   per-step overhead weighs far more than in the 12B / 1.3B transformers; the node's "% FLOPs
   skipped" counts the proxy's own FLOPs. They are NOT the GPU speed-ups on FLUX.1-dev / Wan 2.1;
   see BENCHMARKS.md for those.""",
}

MODEL_SETS = {"proxy": ("image", "video"), "tiny": ("flux", "wan")}


def proxy_server_args() -> list[str]:
    """``main.py`` arguments that load the proxy nodes (benchmarks/proxy/custom_nodes)."""
    return ["--extra-model-paths-config", str(PROXY_PATHS_YAML)]


def select_cases(models: str, workflow: str, **settings) -> tuple[list[Case], list[str]]:
    """The cases to run and the messages about the ones skipped (a proxy without weights)."""
    keys = MODEL_SETS[models] if workflow == "both" else (workflow,)
    if any(k not in MODEL_SETS[models] for k in keys):
        raise SystemExit(f"--workflow {workflow} is not one of the {models} workflows "
                         f"({', '.join(MODEL_SETS[models])} or both)")
    cases, skipped = [], []
    for key in keys:
        if models == "proxy" and not proxy_weights(key).is_file():
            skipped.append(f"== {key} proxy: SKIPPED -- {proxy_weights(key)} does not exist yet "
                           f"(train it with benchmarks/proxy/train_{key}_proxy.py; "
                           f"{PROXY_DIR.relative_to(REPO)}/workflows/{key}_proxy_dynamic_patch.json is ready for it)")
            continue
        cases.append(make_case(key, **settings))
    return cases, skipped


@contextlib.contextmanager
def comfyui_output_to(buffer):
    """What ComfyUI prints *in this process* goes to ``buffer``, not the terminal: its root-logger
    warnings (custom-node import failures: a module-level ``logging.warning`` would otherwise set up
    a terminal handler), stdout and stderr. The root logger's handlers are restored afterwards,
    dropping any ComfyUI added."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [logging.StreamHandler(buffer)]
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield buffer
    finally:
        root.handlers = saved


def _shown_path(path: Path) -> str:
    """``path`` relative to the working directory where it lies below it (shorter to read)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", choices=["proxy", "tiny"], default="proxy",
                        help="proxy: the trained proxies (default); tiny: random-weight FLUX/Wan stand-ins")
    parser.add_argument("--workflow", choices=["image", "video", "flux", "wan", "both"], default="both",
                        help="proxy: image / video; tiny: flux / wan (default both)")
    parser.add_argument("--seed", type=int, default=None, help="KSampler seed (default: the workflow's, 42)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: 28 image/FLUX, 30 video/Wan)")
    parser.add_argument("--width", type=int, default=None, help="default: image proxy 256, video proxy 128, FLUX 512, Wan 256")
    parser.add_argument("--height", type=int, default=None, help="default: as --width")
    parser.add_argument("--frames", type=int, default=None, help="video length (default: video proxy 33, Wan 17)")
    parser.add_argument("--batch", type=int, default=None,
                        help="proxy batch = grid columns, item i = class i %% 10 (default: image 10, video 5)")
    parser.add_argument("--schedule", default=None,
                        help="forced schedule of the accelerated run (default: ~20%% native, then 2p)")
    parser.add_argument("--no-dynamic", action="store_true", help="skip the automatic-schedule run")
    parser.add_argument("--no-router", action="store_true",
                        help=f"skip the image proxy's Elastic Token Router run (budget {ROUTER_BUDGET:g})")
    parser.add_argument("--no-merge", action="store_true",
                        help=f"skip the image proxy's Token Merge run (ratio {MERGE_RATIO:g})")
    parser.add_argument("--out", type=Path, default=OUT_DIR,
                        help="where the PNGs, the summary and ComfyUI's log go (out/)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help=f"time limit per prompt (default: ${PROMPT_TIMEOUT_ENV}, else none; 0 = none)")
    args = parser.parse_args(argv)
    timeout = prompt_timeout(args.timeout)

    from comfy_server import ComfyError, ComfyServer

    cases, skipped = select_cases(args.models, args.workflow, width=args.width, height=args.height,
                                  steps=args.steps, frames=args.frames, seed=args.seed,
                                  schedule=args.schedule, batch=args.batch if args.models == "proxy" else None)
    t0 = time.monotonic()
    print(BANNER)
    print(MODEL_LINES[args.models], flush=True)
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Device: CPU, {cores} cores (no GPU); 1-min load average {load:.1f} before starting"
          + (" -- other processes may be competing for the CPU: timings are noisy" if load > 0.5 * cores else ""))
    for line in skipped:
        print(line)
    results = []
    extra = proxy_server_args() if args.models == "proxy" else []
    log_path = args.out / SERVER_LOG_NAME
    print(f"Starting ComfyUI (headless main.py, --cpu) with this pack; its own output (import messages, "
          f"warnings) goes to\n  {_shown_path(log_path)}", flush=True)
    # the server's folder holds the tiny test models; a first run builds them with ComfyUI imported
    # in this process, whose import messages belong in the log too (added when the server stops)
    in_process = io.StringIO()
    with comfyui_output_to(in_process):
        import tiny_models

        tiny_models.write_example_models()
    try:
        with ComfyServer(extra_args=extra, log_file=log_path, start_timeout=max(600.0, timeout or 0)) as server:
            print(f"ComfyUI up in {server.start_seconds:.1f} s at {server.url}; per-prompt time limit: "
                  + (f"{timeout:.0f} s" if timeout else f"none (--timeout or {PROMPT_TIMEOUT_ENV} sets one)") + "\n",
                  flush=True)
            object_info = server.object_info()
            for case in cases:
                result = run_case(server, case, object_info=object_info, dynamic=not args.no_dynamic,
                                  out_dir=args.out, timeout=timeout, router=not args.no_router,
                                  merge=not args.no_merge)
                results.append(result)
                print(report(result) + "\n", flush=True)
    except PromptTimeout as exc:
        print(f"\nMain job stopped: {exc}", file=sys.stderr)
        return 2
    except ComfyError as exc:
        print(f"\nMain job failed: {exc}\nComfyUI's own log: {_shown_path(log_path)}", file=sys.stderr)
        return 1
    finally:
        if in_process.getvalue() and log_path.is_file():
            with open(log_path, "a", encoding="utf-8") as log:
                log.write("\n--- ComfyUI imported in the main job's own process (building the tiny test models) ---\n"
                          + in_process.getvalue())
    args.out.mkdir(parents=True, exist_ok=True)
    summary = args.out / "main_job.json"
    model = ("trained proxies (benchmarks/proxy)" if args.models == "proxy"
             else "tiny random-weight stand-ins (tests/support/tiny_models.py)")
    summary.write_text(json.dumps({"model": model, "device": "cpu", "skipped": skipped,
                                   "results": [r.as_json() for r in results]}, indent=1))
    print(NOTES[args.models])
    print(f"\nSummary JSON: {summary}\nComfyUI's own log: {_shown_path(log_path)}")
    print(f"Main job done in {time.monotonic() - t0:.1f} s (server start included).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
