"""The real ComfyUI frontend in a real (headless) browser, against a real ComfyUI server (issue 15, item 4).

A ComfyUI server (``main.py``, tests/support/comfy_server.py) with this pack, the tiny models and the
proxy nodes serves the ``comfyui-frontend-package`` that its ComfyUI pins (its requirements.txt:
1.32.9 for ComfyUI 0.3.75) instead of the API tests' stub page; headless Chromium (Debian's
``chromium``) loads it and is driven through the Chrome DevTools Protocol (a websocket; aiohttp,
which ComfyUI already needs). Checked as a user would see it:

* every example workflow (``workflows/*.json``, ``benchmarks/proxy/workflows/*.json``) loads with
  no missing-node and no missing-model dialog, every node registered and at least as large as the
  frontend computes its widgets need (nothing cut off);
* the pack's nodes show sliders (tau, rho, strength) and their tooltips (hovering tau shows it);
* the image proxy workflow queued with the page's own Run button completes, and its Save Image
  node shows the image;
* negative controls: a workflow with a renamed node type shows the missing-node dialog naming it;
  a workflow whose model file is absent shows the missing-model dialog with the download hint.

Screenshots go to ``out/browser/frontend-<version>/`` (ignored), with the browser's console messages
(``console.log``), Chromium's and ComfyUI's output. Runs against whichever ComfyUI the suite tests
(``COMFYUI_PATH``): passed with ComfyUI 0.3.75 / frontend 1.32.9 and 0.33.0 / 1.49.6, about 1 min each
on a 2-core CPU. Marked ``browser`` (deselect with ``-m "not browser"``) and ``server``.
SKIPS, saying what to install, without Chromium or the frontend package: ``bash
scripts/install_browser.sh`` installs both (``apt-get install chromium``; the frontend with
``pip install --target .runtime/frontend/<version>``).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests" / "support"))
import comfy_runtime  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.server]

ART = REPO / "out" / "browser"  # one folder per frontend version: out/browser/frontend-<version>/
WORKFLOWS = sorted((REPO / "workflows").glob("*.json")) + sorted((REPO / "benchmarks" / "proxy" / "workflows").glob("*.json"))
PACK_NODES = {"ElasticTokensDynamicPatchSchedule", "ElasticTokensLoadPatchAdapter"}
INSTALL_HINT = "bash scripts/install_browser.sh"
VIEW = (1600, 1000)
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy


# =========================================================================== what the test needs


def chrome_binary() -> str | None:
    """$CHROME_BIN, else the first Chromium / Chrome on PATH."""
    env = os.environ.get("CHROME_BIN")
    if env and os.access(env, os.X_OK):
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome",
                 "chrome-headless-shell"):
        path = shutil.which(name)
        if path:
            return path
    return None


def frontend_version(comfyui: Path) -> str | None:
    """The ``comfyui-frontend-package==X`` the ComfyUI at ``comfyui`` pins (its requirements.txt)."""
    req = comfyui / "requirements.txt"
    for line in req.read_text().splitlines() if req.is_file() else []:
        name, _, version = line.partition("==")
        if name.strip().lower().replace("_", "-") == "comfyui-frontend-package":
            return version.split(";")[0].strip()
    return None


def frontend_root(version: str) -> Path | None:
    """The static folder of frontend ``version``: .runtime/frontend/<version> (scripts/install_browser.sh)
    or an installed ``comfyui_frontend_package`` of that version."""
    static = REPO / ".runtime" / "frontend" / version / "comfyui_frontend_package" / "static"
    if (static / "index.html").is_file():
        return static
    try:
        from importlib.metadata import version as installed

        import comfyui_frontend_package

        if installed("comfyui-frontend-package") == version:
            static = Path(comfyui_frontend_package.__file__).parent / "static"
            return static if (static / "index.html").is_file() else None
    except Exception:  # noqa: BLE001  (not installed, or another version)
        pass
    return None


# =========================================================================== a small DevTools client


class Chrome:
    """Headless Chromium driven through the Chrome DevTools Protocol (one page)."""

    def __init__(self, binary: str, log_path: Path, size=VIEW):
        self.profile = Path(tempfile.mkdtemp(prefix="elastic-tokens-chrome-"))
        self._log = open(log_path, "wb")
        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", "--remote-debugging-port=0", "--remote-allow-origins=*",
                f"--user-data-dir={self.profile}", f"--window-size={size[0]},{size[1]}", "about:blank"]
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.events: list[dict] = []
        self._id = 0
        self.loop = asyncio.new_event_loop()
        try:
            port = self._devtools_port(timeout=60)
            with _HTTP.open(f"http://127.0.0.1:{port}/json/list", timeout=30) as resp:
                targets = json.loads(resp.read())
            ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
            self.ws = self.loop.run_until_complete(self._connect(ws_url))
            for domain in ("Page", "Runtime"):
                self.send(f"{domain}.enable")
            self.send("Emulation.setDeviceMetricsOverride",
                      {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            self.close()
            raise

    def _devtools_port(self, timeout: float) -> int:
        path = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Chromium exited with {self.proc.returncode}: see {self._log.name}")
            if path.is_file() and path.read_text().strip():
                return int(path.read_text().split()[0])
            time.sleep(0.1)
        raise RuntimeError(f"Chromium opened no DevTools port within {timeout:.0f} s")

    async def _connect(self, url: str):
        import aiohttp

        self.session = aiohttp.ClientSession(trust_env=False)
        return await self.session.ws_connect(url, max_msg_size=0)

    async def _call(self, method: str, params: dict, timeout: float) -> dict:
        import aiohttp

        self._id += 1
        mid = self._id
        await self.ws.send_json({"id": mid, "method": method, "params": params})
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.ws.receive(timeout=max(0.1, deadline - time.monotonic()))
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"DevTools connection closed ({msg.type}) during {method}")
            data = json.loads(msg.data)
            if data.get("id") == mid:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data.get("result", {})
            self.events.append(data)

    def send(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        return self.loop.run_until_complete(self._call(method, params or {}, timeout))

    def js(self, expression: str, timeout: float = 60):
        """Evaluate ``expression`` in the page (promises awaited); returns its JSON value."""
        res = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                             "returnByValue": True, "userGesture": True}, timeout=timeout)
        if "exceptionDetails" in res:
            det = res["exceptionDetails"]
            raise RuntimeError(f"page JS failed: {det.get('exception', {}).get('description') or det.get('text')}")
        return res.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60, what: str = "") -> object:
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for {what or expression}")
            time.sleep(0.2)

    def on_new_document(self, script: str) -> None:
        """Run ``script`` in every page before its own scripts (e.g. to preset localStorage)."""
        self.send("Page.addScriptToEvaluateOnNewDocument", {"source": script})

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def mouse_move(self, x: float, y: float) -> None:
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})

    def console_lines(self) -> list[str]:
        lines = []
        for ev in self.events:
            if ev.get("method") == "Runtime.consoleAPICalled":
                p = ev["params"]
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
                lines.append(f"console.{p.get('type')}: {text}")
            elif ev.get("method") == "Runtime.exceptionThrown":
                det = ev["params"]["exceptionDetails"]
                lines.append(f"exception: {det.get('exception', {}).get('description') or det.get('text')}")
        return lines

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                self.loop.run_until_complete(self.ws.close())
            if getattr(self, "session", None) is not None:
                self.loop.run_until_complete(self.session.close())
        except Exception:  # noqa: BLE001
            pass
        self.loop.close()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


# =========================================================================== fixtures


@pytest.fixture(scope="module")
def art(frontend) -> Path:
    """Where this run's screenshots and logs go: out/browser/frontend-<version>/."""
    path = ART / f"frontend-{frontend_version(comfy_runtime.comfyui_path())}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def frontend() -> Path:
    version = frontend_version(comfy_runtime.comfyui_path())
    if version is None:
        pytest.skip(f"the ComfyUI under test ({comfy_runtime.comfyui_path()}) pins no comfyui-frontend-package")
    static = frontend_root(version)
    missing = []
    if static is None:
        missing.append(f"the ComfyUI frontend {version} (pip install --target .runtime/frontend/{version} "
                       f"comfyui-frontend-package=={version})")
    if chrome_binary() is None:
        missing.append("Chromium (apt-get install chromium, or set CHROME_BIN)")
    if missing:
        pytest.skip(f"browser test needs {' and '.join(missing)}: run {INSTALL_HINT}")
    return static


@pytest.fixture(scope="module")
def ui_server(frontend, art):
    import run_example
    from comfy_server import ComfyServer

    args = run_example.proxy_server_args() + ["--front-end-root", str(frontend)]  # the last one wins
    with ComfyServer(extra_args=args, log_file=art / "comfyui_server.log") as server:
        # a first visit opens the template browser; the tests start from an empty, quiet canvas
        settings = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.Persist": False,
                    "Comfy.Minimap.Visible": False,  # it would cover part of the screenshots
                    "LiteGraph.Canvas.MinFontSizeForLOD": 0}  # draw text at every zoom (readable screenshots)
        for key, value in settings.items():
            req = urllib.request.Request(f"{server.url}/settings/{key}", data=json.dumps(value).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
            _HTTP.open(req, timeout=30).read()
        yield server


@pytest.fixture(scope="module")
def page(ui_server, art):
    browser = Chrome(chrome_binary(), art / "chromium.log")
    browser.art = art
    try:
        t0 = time.monotonic()
        # the "Nodes 2.0" announcement banner (localStorage) would cover the top of the screenshots
        browser.on_new_document("localStorage.setItem('vueNodesBannerDismissed', 'true')")
        browser.navigate(ui_server.url)
        browser.wait_for("!!(window.app && window.app.graph && window.app.canvas && window.LiteGraph"
                         " && LiteGraph.registered_node_types['ElasticTokensDynamicPatchSchedule'])",
                         timeout=180, what="the ComfyUI frontend to start")
        browser.load_seconds = time.monotonic() - t0
        _close_dialogs(browser)
        yield browser
    finally:
        (art / "console.log").write_text("\n".join(browser.console_lines()) + "\n")
        browser.close()


# =========================================================================== page helpers

# what tells the user something is wrong: dialogs and toasts (frontend 1.32), the error overlay
# (1.49 shows missing nodes there), alert dialogs
DIALOG_SELECTOR = ".p-dialog, .p-toast-message, [data-testid='error-overlay'], [role='alertdialog'], [role='alert']"
DIALOGS_JS = f"""[...document.querySelectorAll("{DIALOG_SELECTOR}")].filter(d => d.offsetParent !== null || d.getClientRects().length)
  .map(d => d.innerText.replace(/\\s+/g, ' ').trim())"""


def _dialogs(page) -> list[str]:
    return page.js(DIALOGS_JS) or []


def _close_dialogs(page) -> None:
    for _ in range(3):
        if not _dialogs(page):
            return
        page.js(f"""(() => {{ for (const d of document.querySelectorAll("{DIALOG_SELECTOR}"))
            for (const b of d.querySelectorAll('.p-dialog-close-button, .p-toast-close-button, '
                 + 'button[aria-label="Close" i], button[aria-label="Dismiss" i], button[aria-label*="close" i]'))
              b.click(); return true }})()""")
        page.send("Input.dispatchKeyEvent", {"type": "keyDown", "key": "Escape", "code": "Escape",
                                             "windowsVirtualKeyCode": 27})
        page.send("Input.dispatchKeyEvent", {"type": "keyUp", "key": "Escape", "code": "Escape",
                                             "windowsVirtualKeyCode": 27})
        time.sleep(0.5)
    page.wait_for(f"({DIALOGS_JS}).length === 0", timeout=10, what="the dialogs to close")


def _load(page, wf: dict, name: str) -> list[str]:
    """Open ``wf`` as a file the user drops on the page or picks with Open (``app.handleFile``);
    returns the texts of the dialogs and notifications it opened."""
    _close_dialogs(page)
    page.js(f"""(async () => {{ const text = {json.dumps(json.dumps(wf))}, name = {json.dumps(name)};
        if (app.handleFile) await app.handleFile(new File([text], name, {{type: 'application/json'}}));
        else await app.loadGraphData(JSON.parse(text), true, true, name);
        return true }})()""")
    page.wait_for(f"app.graph.nodes.length === {len(wf['nodes'])}", timeout=30, what=f"{name} to load")
    time.sleep(0.8)  # dialogs open after the graph is configured
    _fit(page)
    return _dialogs(page)


def _fit(page) -> None:
    """Zoom the canvas to show the whole graph (the UI's "Zoom to fit") and draw it."""
    page.js("""(async () => { app.canvas.deselectAll?.();
        try { await app.extensionManager.command.execute('Comfy.Canvas.FitView') } catch (e) {}
        app.canvas.setDirty(true, true); app.canvas.draw(true, true); return true })()""")
    time.sleep(0.3)


# Widgets whose label and value do not fit side by side: litegraph's drawTruncatingText (combo,
# number and text widgets) shortens them when labelWidth + gap + valueWidth exceeds the room it
# has; the wrapper records each such draw, with the numbers the frontend itself computed.
CUT_WIDGETS_JS = """(() => {
  const protos = new Set();
  for (const n of app.graph.nodes) for (const w of n.widgets || []) {
    let p = Object.getPrototypeOf(w);
    while (p && !Object.prototype.hasOwnProperty.call(p, 'drawTruncatingText')) p = Object.getPrototypeOf(p);
    if (p) protos.add(p);
  }
  window.__etCut = new Map();
  for (const p of protos) {
    if (p.__etWrapped) continue;
    const draw = p.drawTruncatingText;
    p.drawTruncatingText = function (args) {
      try {
        const {ctx, width, leftPadding = 5, rightPadding = 20} = args, C = this.constructor;
        const margin = C.margin ?? 15, gap = C.labelValueGap ?? 5;
        const room = width - (margin * 2 + leftPadding) - 2 * margin - rightPadding;
        const need = ctx.measureText(this.displayName ?? this.label ?? this.name).width + gap
                     + ctx.measureText(String(this._displayValue ?? '')).width;
        if (need > room + 0.5 && window.__etCut) {
          const node = app.graph.nodes.find(n => n.widgets?.includes(this));
          window.__etCut.set(`${node?.type}.${this.name}`, [Math.ceil(need - room)]);
        }
      } catch (e) {}
      return draw.call(this, args);
    };
    p.__etWrapped = true;
  }
  app.canvas.setDirty(true, true); app.canvas.draw(true, true);
  const cut = Object.fromEntries(window.__etCut); window.__etCut = null;
  return cut })()"""

# DOM widgets (multiline text, markdown notes) of one node whose content needs scrolling, as drawn
# at 100% zoom (``%s`` = the node id)
SCROLLED_WIDGETS_JS = """(() => { const n = app.graph.getNodeById(%s), cut = {};
  for (const w of n.widgets || []) {
    const el = w.element || w.inputEl;
    if (!el || !el.isConnected || !el.offsetParent) continue;
    const shown = [el, ...el.querySelectorAll('textarea, .tiptap, .ProseMirror')]
      .filter(e => e.checkVisibility ? e.checkVisibility({opacityProperty: true, visibilityProperty: true})
                                     : e.offsetParent !== null);  // the markdown source is there at opacity 0
    const over = Math.max(0, ...shown.map(e => e.scrollHeight - e.clientHeight));
    if (over > 2) cut[`${n.type}.${w.name}`] = ['scroll', over];
  }
  return cut })()"""


def _cut_widgets(page) -> dict:
    """Widgets of the loaded graph drawn cut off: {"Type.widget": [px missing] or ["scroll", px hidden]}."""
    cut = page.js(CUT_WIDGETS_JS)
    for nid in page.js("app.graph.nodes.filter(n => (n.widgets || []).some(w => w.element || w.inputEl))"
                       ".map(n => n.id)"):
        page.js(f"(() => {{ const n = app.graph.getNodeById({nid}); app.canvas.ds.scale = 1;"
                f" app.canvas.ds.offset = [-n.pos[0] + 100, -n.pos[1] + 100];"
                f" app.canvas.setDirty(true, true); app.canvas.draw(true, true); return true }})()")
        time.sleep(0.3)  # DOM widgets follow the canvas on the next frame
        cut.update(page.js(SCROLLED_WIDGETS_JS % nid))
    _fit(page)
    return cut


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _image_proxy() -> dict:
    return _read(REPO / "benchmarks" / "proxy" / "workflows" / "image_proxy_dynamic_patch.json")


# =========================================================================== the tests


def test_frontend_is_the_pinned_package(ui_server, page, frontend):
    version = frontend_version(comfy_runtime.comfyui_path())
    assert frontend.parts[-2] == "comfyui_frontend_package"
    shown = page.js("window.__COMFYUI_FRONTEND_VERSION__ || null")
    assert shown in (None, version), shown
    assert page.js("document.title") and "test stub" not in page.js("document.documentElement.outerHTML.slice(0, 2000)")
    page.screenshot(page.art / "00_frontend_started.png")
    print(f"frontend {version} up in {page.load_seconds:.1f} s")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_loads_without_missing_nodes_or_models(page, path):
    wf = _read(path)
    dialogs = _load(page, wf, path.name)
    shot = page.screenshot(page.art / f"workflow_{path.stem}.png")
    assert dialogs == [], f"{path.name} opened dialogs: {dialogs} (screenshot {shot})"
    unknown = page.js("app.graph.nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type)")
    assert unknown == [], unknown
    # nothing cut off: each node in the file is at least as large as its title and widgets need
    need = page.js("Object.fromEntries(app.graph.nodes.map(n => [n.id, n.computeSize()]))")
    small = {n["type"]: (n["size"], [round(v) for v in need[str(n["id"])]]) for n in wf["nodes"]
             if n["type"] not in ("Note", "MarkdownNote")
             and (n["size"][0] < need[str(n["id"])][0] - 1 or n["size"][1] < need[str(n["id"])][1] - 1)}
    assert small == {}, f"nodes smaller than their widgets need (file size, needed): {small}"
    # no widget drawn cut: labels and values fit side by side, text boxes need no scrolling
    cut = _cut_widgets(page)
    assert cut == {}, f"widgets drawn cut off (px missing, or 'scroll' and px hidden): {cut}"
    # and no node overlaps another once drawn at that size (title bar included)
    boxes = page.js("""app.graph.nodes.map(n => [n.type, n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT,
                        n.pos[0] + n.size[0], n.pos[1] + n.size[1]])""")
    overlaps = [(a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
                if a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]]
    assert overlaps == [], f"overlapping nodes: {overlaps}"


def test_pack_nodes_show_sliders_and_tooltips(page, ui_server):
    _load(page, _image_proxy(), "image_proxy_dynamic_patch.json")
    # the tooltip the frontend shows for a widget: its own, else its input's in the node definition
    widgets = page.js("""Object.fromEntries(app.graph.nodes.filter(n => n.type.startsWith('ElasticTokens')
        && !n.type.startsWith('ElasticTokensProxy')).map(n => { const d = n.constructor.nodeData?.input || {};
        return [n.type, n.widgets.map(w => ({name: w.name, type: w.type, tooltip: w.tooltip
            || (d.required?.[w.name] || d.optional?.[w.name] || [])[1]?.tooltip || null}))] }))""")
    schedule = {w["name"]: w for w in widgets["ElasticTokensDynamicPatchSchedule"]}
    adapter = {w["name"]: w for w in widgets["ElasticTokensLoadPatchAdapter"]}
    assert schedule["tau"]["type"] == "slider" and schedule["rho"]["type"] == "slider", schedule
    assert adapter["strength"]["type"] == "slider", adapter
    info = ui_server.object_info("ElasticTokensDynamicPatchSchedule")["ElasticTokensDynamicPatchSchedule"]
    tau_tip = info["input"]["required"]["tau"][1]["tooltip"]
    assert schedule["tau"]["tooltip"] == tau_tip
    assert all(w["tooltip"] for w in list(schedule.values()) + list(adapter.values())), (schedule, adapter)

    # hover the tau slider: the frontend shows its tooltip
    page.js("(() => { const n = app.graph.nodes.find(n => n.type === 'ElasticTokensDynamicPatchSchedule');"
            " app.canvas.ds.scale = 1; app.canvas.ds.offset = [-n.pos[0] + 500, -n.pos[1] + 300];"
            " app.canvas.setDirty(true, true); app.canvas.draw(true, true); return true })()")
    time.sleep(0.3)
    x, y = page.js("""(() => { const n = app.graph.nodes.find(n => n.type === 'ElasticTokensDynamicPatchSchedule');
        const w = n.widgets.find(w => w.name === 'tau'); const r = app.canvas.canvas.getBoundingClientRect();
        const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([n.pos[0] + n.size[0] * 0.3,
                                                              n.pos[1] + (w.y ?? w.last_y) + 10]);
        return [r.left + cx, r.top + cy] })()""")
    for dx in (0, 2, 4):  # a few moves: the tooltip timer starts on mouse movement over the canvas
        page.mouse_move(x + dx, y)
        time.sleep(0.1)
    tip = page.wait_for("document.querySelector('.node-tooltip')?.innerText || ''", timeout=10,
                        what="the tau tooltip")
    page.screenshot(page.art / "tooltip_tau_slider.png")
    assert tip.strip().startswith(tau_tip[:40]), tip
    page.mouse_move(5, 5)


def test_proxy_workflow_queued_from_the_page_completes(page, ui_server):
    wf = _image_proxy()
    before = set(json.loads(_HTTP.open(ui_server.url + "/history", timeout=30).read()))
    _load(page, wf, "image_proxy_dynamic_patch.json")
    # small enough for a CPU test: one image, 4 steps (the values a user would type in the widgets)
    page.js("""(() => { const set = (type, name, v) => { const n = app.graph.nodes.find(n => n.type === type);
        const w = n.widgets.find(w => w.name === name); w.value = v; w.callback?.(v) };
        set('EmptySD3LatentImage', 'batch_size', 1); set('KSampler', 'steps', 4);
        set('ElasticTokensDynamicPatchSchedule', 'forced_schedule', '1x1,2x3'); return true })()""")
    clicked = page.js("""(() => { const b = document.querySelector('[data-testid="queue-button"] button')
        || document.querySelector('[data-testid="queue-button"]'); if (!b) return false; b.click(); return true })()""")
    if not clicked:  # an older/newer toolbar: the same queue path the button takes
        page.js("app.queuePrompt(0, 1).then(() => true)")
    deadline = time.monotonic() + 120
    while True:
        history = json.loads(_HTTP.open(ui_server.url + "/history", timeout=30).read())
        new = [v for k, v in history.items() if k not in before]
        if new and new[0].get("status", {}).get("completed") is not None:
            break
        assert time.monotonic() < deadline, "the queued prompt did not finish in 120 s"
        time.sleep(0.5)
    entry = new[0]
    assert entry["status"]["status_str"] == "success", entry["status"]
    prompt = entry["prompt"][2]
    assert any(n["class_type"] == "ElasticTokensDynamicPatchSchedule" for n in prompt.values())
    assert any(n["class_type"] == "ElasticTokensLoadPatchAdapter" for n in prompt.values())
    images = [i for out in entry["outputs"].values() for i in out.get("images", [])]
    assert images, entry["outputs"]
    # the page received the result: the Save Image node shows it
    page.wait_for("(() => { const n = app.graph.nodes.find(n => n.type === 'SaveImage');"
                  " return !!(n.imgs && n.imgs.length && n.imgs[0].complete && n.imgs[0].naturalWidth) })()",
                  timeout=30, what="the Save Image node to show the image")
    _fit(page)
    page.screenshot(page.art / "proxy_run_from_page_done.png")
    assert any("1 at p, 3 at 2p" in line for line in ui_server.log_text().splitlines()
               if line.startswith("Dynamic Patch Schedule:")), "the pack's node did not run the forced schedule"


def test_renamed_node_type_shows_the_missing_node_dialog(page):
    wf = _image_proxy()
    renamed = "ElasticTokensDynamicPatchScheduleRenamed"
    for node in wf["nodes"]:
        if node["type"] == "ElasticTokensDynamicPatchSchedule":
            node["type"] = renamed
            node["properties"]["Node name for S&R"] = renamed
    dialogs = _load(page, wf, "negative_control_renamed_node.json")
    page.screenshot(page.art / "negative_control_missing_node_dialog.png")
    assert any(renamed in d for d in dialogs), dialogs
    _close_dialogs(page)


def test_absent_model_file_shows_the_download_hint(page):
    wf = _read(REPO / "workflows" / "flux1_dev_dynamic_patch_t2i.json")
    loader = next(n for n in wf["nodes"] if n["type"] == "UNETLoader")
    hint = copy.deepcopy(loader["properties"]["models"][0])
    absent = "flux1-dev-not-downloaded.safetensors"
    loader["widgets_values"][0] = absent
    loader["properties"]["models"] = [{**hint, "name": absent}]
    dialogs = _load(page, wf, "negative_control_absent_model.json")
    assert any(absent in d for d in dialogs), dialogs
    if not any(hint["directory"] in d for d in dialogs):
        # frontend 1.49: a notification names the file; its "View details" opens the panel that
        # offers the download (1.32: the dialog itself lists "directory / name" with Download)
        page.js(f"""(() => {{ const b = [...document.querySelectorAll("{DIALOG_SELECTOR}")].flatMap(d =>
            [...d.querySelectorAll('button')]).find(b => /details/i.test(b.innerText)); b?.click(); return true }})()""")
        time.sleep(1.0)
        dialogs = [page.js(f"""[...document.querySelectorAll('body *')].filter(e => e.children.length < 40
            && (e.innerText || '').includes({json.dumps(absent)}) && /Download/.test(e.innerText || ''))
            .map(e => e.innerText.replace(/\\s+/g, ' ')).sort((a, b) => a.length - b.length)[0] || ''""")]
    page.screenshot(page.art / "negative_control_missing_model_dialog.png")
    assert any(absent in d and hint["directory"] in d and "Download" in d for d in dialogs), dialogs
    _close_dialogs(page)
