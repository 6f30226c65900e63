"""Attach a trained patch adapter to a MODEL, for the Dynamic Patch Schedule's coarse steps only.

The adapter rides in the cloned model's ``transformer_options`` (a holder object that ComfyUI's
``clone()`` deep copy keeps as one shared, read-only instance). The schedule's coarse steps read
it (ideas/patch/planner.py hands it to the coarse calls); native steps never look at it, so they run the untouched base model.
User LoRAs are weight patches and stay in place underneath: the adapter's LoRA is added on the
activations, on top of whatever weights the model has.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch

from ...families import FamilyBinding, binding_for
from ...runtime.lora_hooks import activation_lora
from ..learned_file import check_fits
from .adapter_file import AdapterError, PatchAdapter

ADAPTER_KEY = "elastic_tokens_patch_adapter"
log = logging.getLogger("elastic_tokens")


class AdapterHolder:
    """A loaded adapter plus its strength; device/dtype copies are made once and cached."""

    def __init__(self, adapter: PatchAdapter, strength: float, name: str):
        self.adapter = adapter
        self.strength = float(strength)
        self.name = name
        self._parts: dict = {}

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options: share, do not copy
        return self

    @property
    def factors(self) -> tuple[int, ...]:
        return self.adapter.spec.factors

    def covers(self, factor: int) -> bool:
        return factor in self.adapter.spec.factors

    def part(self, factor: int, device):
        key = (factor, str(device))
        if key not in self._parts:
            part = self.adapter.part(factor)
            self._parts[key] = None if part is None else copy.deepcopy(part).to(device=device, dtype=torch.float32)
        return self._parts[key]

    def lora_context(self, diffusion_model, factor: int, device, dtype):
        layers = self.adapter.lora_for(factor, device, dtype)
        scale = self.adapter.spec.lora_scale * self.strength
        if not layers or scale == 0.0:
            return contextlib.nullcontext
        return lambda: activation_lora(diffusion_model, layers, scale)


def check_adapter(model_patcher, adapter: PatchAdapter, binding: FamilyBinding, name: str = "adapter") -> None:
    """Raise :class:`AdapterError` with a readable reason if ``adapter`` was not made for this model."""
    def lora_targets():
        dm = model_patcher.model.diffusion_model
        missing = [m for layers in adapter.lora.values() for m in layers
                   if not isinstance(_submodule(dm, m), torch.nn.Linear)]
        if missing:
            raise AdapterError(f"{name}: its LoRA targets {missing[:3]} are not Linear layers of this model "
                               f"(another architecture or size).")
    check_fits(model_patcher, adapter.spec, binding, name, AdapterError, word="adapter", a_word="an adapter",
               fields=("native_patch", "latent_channels", "hidden_size", "temporal_patch"),
               retrain="an adapter for this model with scripts/train_patch_adapter.py.", after_geometry=lora_targets)


def _submodule(dm, name):
    try:
        return dm.get_submodule(name)
    except AttributeError:
        return None


def attach_patch_adapter(model_patcher, adapter: PatchAdapter, strength: float = 1.0, name: str = "adapter"):
    """Return a clone of ``model_patcher`` carrying ``adapter``; the input is not changed."""
    if not 0.0 <= strength <= 4.0:
        raise ValueError(f"strength must be in [0, 4], got {strength}")
    binding = binding_for(model_patcher)
    check_adapter(model_patcher, adapter, binding, name)
    patched = model_patcher.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    options[ADAPTER_KEY] = AdapterHolder(adapter, strength, name)
    covered = ", ".join(f"{k}p" for k in adapter.spec.factors)
    log.info(f"Elastic Tokens: patch adapter {name} ({covered}, LoRA rank {adapter.spec.rank}, "
             f"{adapter.parameter_count() / 1e6:.2f}M parameters) attached at strength {strength:g}; "
             f"it acts on the Dynamic Patch Schedule's coarse steps only")
    return patched
