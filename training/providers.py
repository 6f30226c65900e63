"""What the training command needs from a model: the provider interface, and loading one.

A provider is any object with these members (subclass :class:`ModelProvider` or duck-type them):
``setup(device)`` makes ComfyUI importable; ``load()`` returns a ComfyUI ModelPatcher;
``empty_latent(batch)`` the zero latent a LATENT node would give; ``conditioning(seeds)`` the
``(positive, negative)`` CONDITIONING for samples with these seeds (batch 1 broadcasts); and the
sampling settings ``steps``, ``cfg``, ``sampler``, ``scheduler``. The benchmarks' providers
(bench/, benchmarks/proxy/) add ``decode(latents)`` for image metrics.

The training command's own provider for a user's files is training/cli.py's ``FilesProvider``;
any other is named on the command line as ``path/to/file.py:factory`` (``factory(args)``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


class ModelProvider:
    name = "provider"
    steps = 28
    cfg = 1.0
    sampler = "euler"
    scheduler = "simple"

    def setup(self, device: str) -> None:
        from .comfy_setup import setup_comfyui

        setup_comfyui(device, verbose=False)

    def load(self):
        raise NotImplementedError

    def empty_latent(self, batch: int):
        raise NotImplementedError

    def conditioning(self, seeds: list[int]):
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name}


def load_factory(spec: str):
    """``"path/to/file.py:factory"`` or ``"package.module:factory"`` -> the factory object.

    A file is imported under its stem (its folder first on ``sys.path`` for its siblings); a
    module of that name already imported from the same file is reused.
    """
    mod_name, _, attr = spec.rpartition(":")
    if not mod_name or not attr:
        raise SystemExit(f"--model {spec!r}: expected FILE.py:FACTORY or MODULE:FACTORY")
    if mod_name.endswith(".py"):
        path = Path(mod_name).resolve()
        if not path.is_file():
            raise SystemExit(f"--model {spec!r}: {path} does not exist")
        module = sys.modules.get(path.stem)
        if module is None or Path(getattr(module, "__file__", "") or "").resolve() != path:
            if str(path.parent) not in sys.path:
                sys.path.insert(0, str(path.parent))
            mspec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(mspec)
            sys.modules[path.stem] = module
            mspec.loader.exec_module(module)
    else:
        module = importlib.import_module(mod_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise SystemExit(f"--model {spec!r}: {mod_name} has no {attr!r}") from None
