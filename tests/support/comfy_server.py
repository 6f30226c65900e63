"""A real ComfyUI server, started from ``main.py`` with this pack installed, for end-to-end tests.

``ComfyServer`` lays out a throw-away base directory the way a user's ComfyUI looks::

    custom_nodes/elastic_tokens            -> this repo (loaded exactly as ComfyUI loads packs)
    custom_nodes/elastic_tokens_tiny_models -> tests/support/custom_nodes/... (tiny-model overrides)
    models/<folder>/<file>                 -> tiny models, cached in .runtime/models
    frontend/index.html                    stub (--front-end-root; API-only tests need no UI)

then runs ``comfy_launcher.py`` (``main.py --cpu``) on a free loopback port with
``ELASTIC_TOKENS_TINY_TEXT_ENCODERS=1`` and talks to it over HTTP (no proxy, loopback only).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

SUPPORT_DIR = Path(__file__).resolve().parent
if str(SUPPORT_DIR) not in sys.path:
    sys.path.insert(0, str(SUPPORT_DIR))
import comfy_runtime  # noqa: E402
import tiny_models  # noqa: E402

LAST_LOG = comfy_runtime.REPO_ROOT / ".runtime" / "comfy_server.log"
# Never send test traffic through a proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ComfyUI 0.33 logs ``\x1b[32m[INFO]\x1b[0m message`` (0.3.75: ``message``): colour codes anywhere,
# and a level tag at the start of a line
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_LEVEL_TAG = re.compile(r"^\[(?:DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)\] ?", re.MULTILINE)


def plain_log(text: str) -> str:
    """A server log as 0.3.75 wrote it: terminal colour codes and leading ``[LEVEL]`` tags removed,
    so every line starts with its message whatever the ComfyUI version."""
    return _LEVEL_TAG.sub("", _ANSI.sub("", text))


class ComfyError(RuntimeError):
    """A prompt was rejected (HTTP 400) or failed while executing; ``details`` holds the JSON."""

    def __init__(self, message: str, details=None):
        super().__init__(message)
        self.details = details


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _link_tree(src: Path, dst: Path) -> None:
    """Mirror ``src`` into ``dst`` as folders of per-file symlinks (the server can't write the cache)."""
    for path in src.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)


class ComfyServer:
    """``with ComfyServer() as srv: srv.run(prompt)``; see module docstring."""

    def __init__(self, models_dir: Path = tiny_models.DEFAULT_MODELS_DIR, start_timeout: float = 120.0,
                 extra_args=(), env=None, log_file=None):
        self.models_dir = Path(models_dir)
        # log_file: where the server's stdout/stderr go (kept after stop); default in the base directory
        self.log_file = Path(log_file) if log_file is not None else None
        self.start_timeout = start_timeout
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.base_dir: Path | None = None
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None
        self._log = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def log_path(self) -> Path:
        return self.log_file if self.log_file is not None else self.base_dir / "comfy_server.log"

    def start(self) -> "ComfyServer":
        tiny_models.write_example_models(self.models_dir)
        base = self.base_dir = Path(tempfile.mkdtemp(prefix="elastic-tokens-comfy-"))
        (base / "custom_nodes").mkdir()
        (base / "custom_nodes" / comfy_runtime.PACK_NAME).symlink_to(comfy_runtime.REPO_ROOT,
                                                                     target_is_directory=True)
        (base / "custom_nodes" / "elastic_tokens_tiny_models").symlink_to(
            SUPPORT_DIR / "custom_nodes" / "elastic_tokens_tiny_models", target_is_directory=True)
        _link_tree(self.models_dir, base / "models")
        for sub in ("user", "input", "output", "temp", "frontend"):
            (base / sub).mkdir(exist_ok=True)
        (base / "frontend" / "index.html").write_text("<!doctype html><title>test stub</title>\n")

        self.port = _free_port()
        args = [sys.executable, str(SUPPORT_DIR / "comfy_launcher.py"),
                "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(base), "--database-url", f"sqlite:///{base}/user/comfyui.db",
                "--front-end-root", str(base / "frontend"), "--disable-auto-launch",
                "--disable-api-nodes", *self.extra_args]
        env = {**os.environ, "ELASTIC_TOKENS_TINY_TEXT_ENCODERS": "1", "PYTHONUNBUFFERED": "1",
               "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
               "ELASTIC_TOKENS_PARENT_PID": str(os.getpid()), **self.env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(args, cwd=base, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with {self.proc.returncode} during startup:\n"
                                 f"{self.log_text()[-6000:]}")
            try:
                self._get("/system_stats", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() - t0 > self.start_timeout:
                    self.stop()
                    raise ComfyError(f"ComfyUI did not answer within {self.start_timeout:.0f}s:\n"
                                     f"{self.log_text()[-6000:]}")
                time.sleep(0.1)
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # main.py catches KeyboardInterrupt and cleans up
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.base_dir is not None and self.base_dir.exists():
            LAST_LOG.parent.mkdir(parents=True, exist_ok=True)
            if self.log_path.exists():
                shutil.copyfile(self.log_path, LAST_LOG)
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "ComfyServer":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ HTTP
    def _request(self, method: str, path: str, body=None, timeout: float = 30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with _HTTP.open(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")

    def _get(self, path: str, timeout: float = 30):
        return self._request("GET", path, timeout=timeout)

    def raw_log_text(self) -> str:
        """Everything the server printed so far (stdout and stderr), as printed."""
        if self.base_dir is not None and self.log_path.exists():
            return self.log_path.read_text(errors="replace")
        return LAST_LOG.read_text(errors="replace") if LAST_LOG.exists() else ""

    def log_text(self) -> str:
        """Everything the server printed so far, as :func:`plain_log` (lines start with the message:
        match them with ``line.startswith(...)`` on any ComfyUI version)."""
        return plain_log(self.raw_log_text())

    def object_info(self, node_class: str | None = None) -> dict:
        """``/object_info`` (every node) or ``/object_info/<node_class>`` ({node_class: info})."""
        return self._get("/object_info" + (f"/{node_class}" if node_class else ""))

    def queue(self, prompt: dict) -> str:
        """POST an API-format prompt; returns its prompt_id. Raises ComfyError on HTTP 400."""
        try:
            res = self._request("POST", "/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                details = json.loads(text)
            except ValueError:
                details = text
            raise ComfyError(f"prompt rejected (HTTP {e.code}): {json.dumps(details, indent=1)}", details) from None
        return res["prompt_id"]

    def wait(self, prompt_id: str, timeout: float | None = 120, on_poll=None) -> dict:
        """Poll ``/history/<id>`` until the prompt finished; returns its history entry.

        ``timeout=None``: no time limit (a dead server still raises). ``on_poll()`` is called
        between polls (e.g. to print progress)."""
        t0 = time.monotonic()
        while True:
            entry = self._get(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None and (entry.get("status") or {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    errors = [d for ev, d in status.get("messages", []) if ev == "execution_error"]
                    text = "\n".join(f"{d.get('node_type')} (node {d.get('node_id')}): "
                                     f"{d.get('exception_type')}: {d.get('exception_message')}\n"
                                     + "".join(d.get("traceback") or []) for d in errors)
                    raise ComfyError(f"prompt {prompt_id} failed:\n{text or json.dumps(status)}", entry)
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI died while running {prompt_id}:\n{self.log_text()[-6000:]}")
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise ComfyError(f"prompt {prompt_id} not done after {timeout}s:\n{self.log_text()[-4000:]}")
            if on_poll is not None:
                on_poll()
            time.sleep(0.05)

    def run(self, prompt: dict, timeout: float = 120) -> dict:
        """queue + wait."""
        return self.wait(self.queue(prompt), timeout)

    def output_files(self, entry: dict, node_id: str | None = None) -> list[Path]:
        """Paths of the images/videos a finished prompt saved (all output nodes, or one)."""
        files = []
        for nid, out in entry.get("outputs", {}).items():
            if node_id is not None and nid != str(node_id):
                continue
            for items in out.values():
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and "filename" in item:
                        root = self.base_dir / item.get("type", "output")
                        files.append(root / item.get("subfolder", "") / item["filename"])
        return files
