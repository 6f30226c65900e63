"""One transformer call at a coarse patch size, through the model's own forward.

The coarse math (downsample, noise-level correction, coarse RoPE positions, upsampled clean
estimate, optional patch adapter) lives in adapters/coarse_forward.py, shared with the adapter
trainer. Here it is bound to ComfyUI's DIFFUSION_MODEL wrapper chain: a coarse step calls the
next executor with the shrunk inputs, so the model's own (LoRA-patched, quantised, compiled...)
layers do the work.
"""

from __future__ import annotations

import inspect

import torch

from ..adapters.call_args import call_bound
from ..adapters.coarse_forward import coarse_velocity


def spatial_blocker(bound: inspect.BoundArguments) -> str | None:
    """Why this call cannot run coarse, or None.

    Any extra tensor laid out on the latent grid (ControlNet residuals, I2V frames concatenated
    in time, VACE/reference latents) is indexed by native token position and would not line up
    with a coarse grid: such calls run at the native patch size.
    """
    x = bound.arguments["x"]
    if bound.arguments.get("control") is not None:
        return "ControlNet"
    extra = dict(bound.arguments.get("kwargs") or {})
    for name, value in list(bound.arguments.items()) + list(extra.items()):
        if name in ("x", "kwargs", "transformer_options") or value is None:
            continue
        if isinstance(value, torch.Tensor) and value.ndim == x.ndim and value.shape[-2:] == x.shape[-2:]:
            return f"spatial input '{name}'"
    return None


def run_coarse(executor, bound: inspect.BoundArguments, factor: int, run, graphs=None, adapter=None) -> torch.Tensor:
    """Evaluate the model at ``factor`` times the native patch and return a full-size velocity.

    ``adapter`` (nodes/adapter_attach.AdapterHolder) adds the trained patch adapter of this
    factor; without it the step is training-free (adapters/coarse_forward.py).
    """
    x = bound.arguments["x"]
    timestep = bound.arguments["timestep"]
    sigma = run.sigma_of(timestep).to(x.device)

    def call(x_small, timestep_small, options_small):
        bound.arguments["x"] = x_small
        bound.arguments["timestep"] = timestep_small
        bound.arguments["transformer_options"] = options_small
        if graphs is not None:
            return graphs.call(factor, bound, lambda b: call_bound(executor, b))
        return call_bound(executor, bound)

    part = lora = None
    if adapter is not None:
        part = adapter.part(factor, x.device)
        lora = adapter.lora_context(executor.class_obj, factor, x.device, x.dtype)
    return coarse_velocity(call, x, sigma, timestep.dtype, factor, run.binding, run.t_per_sigma,
                           bound.arguments["transformer_options"], down=run.config.downsample,
                           up=run.config.upsample, part=part, strength=adapter.strength if adapter else 1.0,
                           lora=lora)
