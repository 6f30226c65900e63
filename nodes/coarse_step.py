"""One transformer call at a coarse patch size, through the model's own forward.

A patch of ``k*p`` cells embedded with PI-resized weights equals the native embed applied to
a ``k``-times downsampled latent (kernels/resize.py). So a coarse step shrinks the inputs and
calls the next executor in ComfyUI's DIFFUSION_MODEL wrapper chain unchanged: the model's
own (LoRA-patched, quantised, compiled...) layers do the work; RoPE gets the coarse grid's
positions through ``rope_options``; the noise level is corrected (kernels/flow.py) and the
output is brought back to full size.
"""

from __future__ import annotations

import functools
import inspect

import torch

from ..kernels import flow
from ..kernels.patchify import pad_to_multiple
from ..kernels.resize import downsample, noise_gain, upsample


@functools.lru_cache(maxsize=32)
def _signature(fn, drop_self: bool) -> inspect.Signature:
    sig = inspect.signature(fn)
    if drop_self:
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])
    return sig


def bind_call(executor, args, kwargs) -> inspect.BoundArguments:
    """Name the arguments of a DIFFUSION_MODEL call (``x``, ``timestep``, ``context``, ...).

    Uses the wrapped ``_forward``'s own signature, so it follows ComfyUI's argument order
    for each family and version instead of hard-coding positions. (Cached per function, not
    per bound method, so no model instance is kept alive by the cache.)
    """
    fn = executor.original
    func = getattr(fn, "__func__", None)
    sig = _signature(func, True) if func is not None else _signature(fn, False)
    return sig.bind(*args, **kwargs)


def call_bound(executor, bound: inspect.BoundArguments):
    return executor(*bound.args, **bound.kwargs)


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


def run_coarse(executor, bound: inspect.BoundArguments, factor: int, run, graphs=None) -> torch.Tensor:
    """Evaluate the model at ``factor`` times the native patch and return a full-size velocity."""
    cfg, binding = run.config, run.binding
    x = bound.arguments["x"]
    timestep = bound.arguments["timestep"]
    options = bound.arguments["transformer_options"]
    sigma = run.sigma_of(timestep).to(x.device)

    padded, (h, w) = pad_to_multiple(x, factor * binding.native_patch)
    gain = noise_gain(factor, binding.native_patch, cfg.downsample)
    small = downsample(padded, factor, binding.native_patch, cfg.downsample)
    small = flow.rescale_to_flow(small, sigma, gain, binding.latent_channels)
    sigma_small = flow.coarse_sigma(sigma, gain)

    coarse_options = dict(options)
    coarse_options["rope_options"] = binding.coarse_rope_options(options.get("rope_options"), factor)
    bound.arguments["x"] = small
    bound.arguments["timestep"] = (sigma_small * run.t_per_sigma).to(timestep.dtype)
    bound.arguments["transformer_options"] = coarse_options

    if graphs is not None:
        velocity_small = graphs.call(factor, bound, lambda b: call_bound(executor, b))
    else:
        velocity_small = call_bound(executor, bound)

    x0_small = flow.clean_estimate(small, velocity_small, sigma_small)
    x0 = upsample(x0_small, factor, cfg.upsample)[..., :h, :w]
    return flow.full_velocity(x, x0, sigma).to(velocity_small.dtype)
