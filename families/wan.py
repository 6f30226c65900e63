"""ComfyUI's WanModel (Wan 2.1 / 2.2 text- and image-to-video): geometry, FLOP model, token stream.

``WanModel.forward_orig`` passes every block the image tokens alone (``img``; text is read by
cross-attention from ``txt``) and the RoPE ``freqs`` of the image tokens, shape
``(1, N, 1, d/2, 2, 2)`` (tokens on axis 1).
"""

from __future__ import annotations

from .base import FamilyBinding, UnsupportedModelError
from .flux import linear_layers


def wan_binding(dm, latent_channels: int) -> FamilyBinding:
    pt, ph, pw = (int(v) for v in dm.patch_size)
    if ph != pw:
        raise UnsupportedModelError(f"Wan model with non-square patch {dm.patch_size} is not supported")
    d = dm.dim
    # self-attn qkvo 4d^2, cross-attn q and o 2d^2, ffn 2*d*ffn
    macs = 6 * d * d + 2 * d * dm.ffn_dim
    n = len(dm.blocks)
    # the feed-forward's Linear layers as the running ComfyUI builds them (``ffn.0`` / ``ffn.2``:
    # nn.Sequential in 0.3.75, WanFeedForward in 0.33, which folds the GELU into the second)
    ff = tuple(f"blocks.{i}.ffn.{name}" for i, block in enumerate(dm.blocks) for name in linear_layers(block.ffn))
    return FamilyBinding(
        "wan", ph, latent_channels, 5, pt, d, n, macs, False,
        block_keys=tuple(("double_block", i) for i in range(n)), pe_token_axis=1, pe_has_text=False,
        fingerprint_names=("patch_embedding.weight", "blocks.0.self_attn.q.weight", f"{ff[-1]}.weight",
                           "head.head.weight"), feed_forward=ff)
