"""ComfyUI's Flux (FLUX.1, Flux Kontext): geometry, FLOP model and token stream.

``Flux.forward_orig`` embeds ``[text, image]`` positions into one ``pe`` of shape
``(B, 1, L, d/2, 2, 2)`` (tokens on axis 2) that every block receives; double blocks carry text
and image in separate streams (``txt``, ``img``), single blocks carry ``img = [text, image]``.
Kontext reference tokens follow the grid tokens in the image stream.
"""

from __future__ import annotations

import torch

from .base import FamilyBinding


def linear_layers(module: torch.nn.Module) -> list[str]:
    """Names of the Linear layers inside ``module`` (a feed-forward), in order, as the running ComfyUI
    builds it; a layer that peft already wrapped (``base_layer``) counts once, under its own name."""
    names = []
    for name, m in module.named_modules():
        if any(name.startswith(n + ".") for n in names):
            continue
        if isinstance(m, torch.nn.Linear) or isinstance(getattr(m, "base_layer", None), torch.nn.Linear):
            names.append(name)
    return names


def flux_binding(dm, latent_channels: int) -> FamilyBinding:
    p = dm.params
    d = dm.hidden_size
    mlp = int(d * p.mlp_ratio)
    # double block, per stream: qkv 3d^2 + proj d^2 + mlp 2*d*mlp; single block: the same, fused
    macs = 4 * d * d + 2 * d * mlp
    n_double, n_single = len(dm.double_blocks), len(dm.single_blocks)
    doubles = tuple(("double_block", i) for i in range(n_double))
    singles = tuple(("single_block", i) for i in range(n_single))
    # the image MLP's Linear layers as the running ComfyUI builds them: ``img_mlp.0`` / ``img_mlp.2``
    # (GELU or SiLU-gated Sequential), ``img_mlp.gate_proj`` / ``up_proj`` / ``down_proj`` (0.33's YakMLP)
    ff = tuple(f"double_blocks.{i}.img_mlp.{name}" for i, block in enumerate(dm.double_blocks)
               for name in linear_layers(block.img_mlp))
    ff += tuple(f"single_blocks.{i}.{name}" for i in range(n_single) for name in ("linear1", "linear2"))
    tail = f"{ff[-1]}.weight" if ff else "final_layer.linear.weight"
    head = "double_blocks.0.img_attn.qkv.weight" if n_double else "single_blocks.0.linear1.weight"
    return FamilyBinding(
        "flux", int(dm.patch_size), latent_channels, 4, 1, d, n_double + n_single, macs, True,
        block_keys=doubles + singles, text_first_blocks=frozenset(singles), pe_token_axis=2, pe_has_text=True,
        fingerprint_names=("img_in.weight", head, tail, "final_layer.linear.weight"), feed_forward=ff)
