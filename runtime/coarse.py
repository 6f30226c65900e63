"""One model evaluation at a coarse patch size, with or without a patch adapter.

Shared by the sampling loop (runtime/execute.py calls the next ComfyUI executor) and by the
adapter trainer (training/distill.py calls an autograd-safe forward), so the student trained
offline is exactly what runs at sampling time.

Training-free path: a patch of ``k*p`` cells embedded with PI-resized weights equals the native
embed applied to a ``k``-times downsampled latent (kernels/resize.py). So the model's own forward
runs on the downsampled latent, its RoPE gets the coarse grid's positions through
``rope_options``, the noise level is corrected (kernels/flow.py) and the clean estimate is
upsampled back to full size.

With an adapter (ideas/patch/adapter_file.py) three things are added, all through ComfyUI's
chainable ``transformer_options["patches_replace"]["dit"]`` block hooks of the first and last
block (runtime/block_hooks.py; never a replaced model method): the embed correction and patch-size embedding are added
to the image tokens entering the first block; the last block's image tokens are kept for the
de-embed correction, which (with the input->output residual) is added to the clean estimate.
LoRA runs inside the model as the caller arranges (``lora`` context: forward hooks at sampling
time, peft layers in training).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..kernels import flow
from ..kernels.patchify import pad_to_multiple, patchify, unpatchify
from ..kernels.resize import downsample, noise_gain, upsample
from ..families import FamilyBinding
from .block_hooks import chain_block_patches


def timestep_per_sigma(model_sampling) -> float:
    """ComfyUI's flow models feed the transformer ``timestep = sigma * m`` (m = 1 for Flux,
    1000 for Wan): ``m`` for this model's sampling object."""
    return float(model_sampling.timestep(torch.tensor(1.0)))


class AdapterCall:
    """The per-call state of an adapter: input patches in, last hidden state out."""

    def __init__(self, part: torch.nn.Module, binding: FamilyBinding, factor: int, x_full: torch.Tensor,
                 strength: float = 1.0):
        self.part = part
        self.binding = binding
        self.strength = strength
        self.patch = (binding.temporal_patch, factor * binding.native_patch, factor * binding.native_patch) \
            if x_full.ndim == 5 else factor * binding.native_patch
        weight = part.embed.weight
        self.patches, self.grid = patchify(x_full[:, :binding.latent_channels].to(weight.dtype), self.patch)
        self.text_tokens = 0
        self.hidden: torch.Tensor | None = None

    def _first(self, args: dict) -> dict:
        img = args["img"]
        n = self.patches.shape[1]
        add = (self.strength * self.part.token_correction(self.patches)).to(img.dtype)
        if img.shape[1] == n:
            img = img + add
        else:  # reference tokens (Kontext) follow the grid tokens: leave them alone
            img = torch.cat([img[:, :n] + add, img[:, n:]], dim=1)
        txt = args.get("txt")
        self.text_tokens = txt.shape[1] if isinstance(txt, torch.Tensor) and txt.ndim == 3 else 0
        return {**args, "img": img}

    def _last(self, out: dict) -> dict:
        self.hidden = self.binding.image_tokens(out["img"], self.patches.shape[1], self.text_tokens)
        return out

    def block_patches(self) -> dict:
        """The first/last block hooks (runtime/block_hooks.py) that feed and read the adapter."""
        first, last = self.binding.first_block, self.binding.last_block
        if first == last:
            return {first: (self._first, self._last)}
        return {first: (self._first, None), last: (None, self._last)}

    def x0_correction(self) -> torch.Tensor:
        if self.hidden is None:
            raise RuntimeError("the model never ran its last block: patch adapter hooks were not called "
                               "(another node replaced the blocks without calling the original)")
        out = self.part.output_correction(self.hidden.to(self.part.deembed.weight.dtype), self.patches)
        return self.strength * unpatchify(out, self.grid, self.patch)


def coarse_velocity(call: Callable, x: torch.Tensor, sigma: torch.Tensor, timestep_dtype, factor: int,
                    binding: FamilyBinding, t_per_sigma: float, options: dict, *, coarse_embed: str = "area",
                    coarse_deembed: str = "bilinear", part: torch.nn.Module | None = None, strength: float = 1.0,
                    lora: Callable[[], contextlib.AbstractContextManager] | None = None) -> torch.Tensor:
    """Full-size velocity from the model evaluated at ``factor`` times the native patch.

    ``call(x_small, timestep_small, options_small)`` evaluates the diffusion model (its other
    arguments bound by the caller). ``part`` is the adapter of this factor (ideas/patch/adapter_file
    ``CoarseAdapter``; None: training-free);
    ``lora()`` returns a context manager that makes the adapter's LoRA active inside ``call``.
    """
    padded, (h, w) = pad_to_multiple(x, factor * binding.native_patch)
    gain = noise_gain(factor, binding.native_patch, coarse_embed)
    small = downsample(padded, factor, binding.native_patch, coarse_embed)
    small = flow.rescale_to_flow(small, sigma, gain, binding.latent_channels)
    sigma_small = flow.coarse_sigma(sigma, gain)

    opts = dict(options)
    opts["rope_options"] = binding.coarse_rope_options(options.get("rope_options"), factor)
    adapter_call = None
    if part is not None:
        adapter_call = AdapterCall(part, binding, factor, padded, strength)
        opts = chain_block_patches(opts, adapter_call.block_patches())
    timestep_small = (sigma_small * t_per_sigma).to(timestep_dtype)
    with (lora() if (lora is not None and part is not None) else contextlib.nullcontext()):
        v_small = call(small, timestep_small, opts)

    x0_small = flow.clean_estimate(small, v_small, sigma_small)
    x0 = upsample(x0_small, factor, coarse_deembed)
    if adapter_call is not None:
        x0 = x0 + adapter_call.x0_correction().to(x0.dtype)
    return flow.full_velocity(x, x0[..., :h, :w], sigma).to(v_small.dtype)
