"""Test-only ComfyUI custom node package: lets the server load the tiny models.

``comfy_server.ComfyServer`` links it into the server's ``custom_nodes/``; importing it calls
``tiny_models.install_overrides()`` inside the server process. It adds no nodes.
"""

import importlib.util
import sys
from pathlib import Path

_SUPPORT = Path(__file__).resolve().parents[2]  # tests/support
if str(_SUPPORT) not in sys.path:
    sys.path.insert(0, str(_SUPPORT))

if "tiny_models" in sys.modules:
    tiny_models = sys.modules["tiny_models"]
else:
    _spec = importlib.util.spec_from_file_location("tiny_models", _SUPPORT / "tiny_models.py")
    tiny_models = importlib.util.module_from_spec(_spec)
    sys.modules["tiny_models"] = tiny_models
    _spec.loader.exec_module(tiny_models)

tiny_models.install_overrides()

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
