"""A patch adapter's LoRA as activation hooks: active only inside one coarse call.

ComfyUI's weight-function mechanism was rejected for this: it copies every feed-forward weight
on every forward, native steps included. Forward hooks add ``scale * B(A(x))`` to the output of
the named Linear layers while the context is open and are removed on exit.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def activation_lora(diffusion_model: torch.nn.Module, layers: dict, scale: float):
    """Add ``scale * B(A(x))`` to the output of each named Linear while the context is open.

    Forward hooks, registered on entry and removed on exit: the weights are never changed, so
    user LoRAs (weight patches), quantised and offloaded weights work as they are, and the native
    steps around a coarse step run the untouched base model.
    """
    handles = []
    try:
        for name, (a, b) in layers.items():
            module = diffusion_model.get_submodule(name)

            def hook(mod, args, out, a=a, b=b):
                x = args[0]
                return out + scale * torch.nn.functional.linear(torch.nn.functional.linear(x.to(a.dtype), a), b).to(out.dtype)
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
