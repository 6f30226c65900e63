"""Model families the pack binds to: one small record per family (families/flux.py, wan.py).

:func:`binding_for` is the one place that tells a MODEL's family; everything above it reads the
:class:`~.base.FamilyBinding` it returns and never the model's class.
"""

from __future__ import annotations

from .base import BlockKey, FamilyBinding, UnsupportedModelError

__all__ = ["BlockKey", "FamilyBinding", "UnsupportedModelError", "binding_for"]


def binding_for(model_patcher) -> FamilyBinding:
    """Return the binding for a ComfyUI ModelPatcher, or raise :class:`UnsupportedModelError`.

    Reads the model; never changes it.
    """
    import comfy.model_sampling
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.wan.model import WanModel

    from .flux import flux_binding
    from .wan import wan_binding

    base = getattr(model_patcher, "model", None)
    dm = getattr(base, "diffusion_model", None)
    name = type(dm).__name__ if dm is not None else type(base).__name__
    channels = getattr(getattr(base, "latent_format", None), "latent_channels", None)
    if isinstance(dm, Flux):
        binding = flux_binding(dm, channels or 16)
    elif isinstance(dm, WanModel):
        binding = wan_binding(dm, channels or 16)
    else:
        raise UnsupportedModelError(
            f"Elastic Tokens supports Flux-family (FLUX.1, Flux Kontext) and Wan 2.x models; "
            f"this MODEL is a {name}. Connect the node after a Flux or Wan model loader.")
    sampling = model_patcher.get_model_object("model_sampling")
    if not isinstance(sampling, comfy.model_sampling.CONST):
        raise UnsupportedModelError(
            f"Elastic Tokens needs a flow-matching model (rectified flow); this {name} uses "
            f"{type(sampling).__name__}.")
    return binding
