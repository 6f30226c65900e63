"""What the pack needs to know about a model family, and nothing more.

Every idea in the pack runs one code path; Flux and Wan differ only in this small record
(built by families/flux.py and families/wan.py):

* geometry: the native spatial patch, latent channels and rank, tokens per latent frame;
* the FLOP model used for every saving the pack reports (:meth:`FamilyBinding.step_flops`);
* the token stream the blocks see: which blocks exist (``patches_replace["dit"]`` keys, in
  order), where a block's image tokens sit in its ``img`` stream (Flux's single blocks carry the
  text tokens first, Wan keeps text in cross-attention), and along which axis the positions
  (``pe``: Flux's RoPE matrices for ``[text, image]``, Wan's ``freqs`` for the image) travel;
* how a coarse grid's positions are told to the model's RoPE (both families read
  ``transformer_options["rope_options"]``).

docs/runtime.md explains how the runtime uses these facts.
"""

from __future__ import annotations

from dataclasses import dataclass


class UnsupportedModelError(ValueError):
    """The MODEL is not one the pack knows how to re-patch."""


BlockKey = tuple  # ("double_block", i) or ("single_block", i): ComfyUI's patches_replace["dit"] keys


@dataclass(frozen=True)
class FamilyBinding:
    family: str              # "flux" or "wan"
    native_patch: int        # spatial patch size of the model (latent cells per token side)
    latent_channels: int     # noisy channels of x (image conditioning may follow)
    latent_ndim: int         # 4 for images (B,C,H,W), 5 for video (B,C,T,H,W)
    temporal_patch: int      # latent frames per token (1 for images)
    hidden_size: int
    blocks: int              # transformer blocks each image token passes through
    linear_macs_per_token: int   # multiply-adds per token per block in the linear layers
    joint_text: bool         # text tokens share the self-attention (Flux) or only cross-attend (Wan)
    block_keys: tuple = ()               # every block's patches_replace["dit"] key, in forward order
    text_first_blocks: frozenset = frozenset()  # blocks whose ``img`` stream is [text, image]
    pe_token_axis: int = 1               # the axis of ``pe`` along which tokens are laid out
    pe_has_text: bool = False            # ``pe`` rows are [text, image] (Flux) or image only (Wan)
    fingerprint_names: tuple = ()        # weights that identify the base model (ideas/patch/adapter_file.py)
    feed_forward: tuple = ()             # the feed-forward Linear layers (LoRA targets of adapters)

    # -- geometry -------------------------------------------------------------------------
    @property
    def first_block(self) -> BlockKey:
        return self.block_keys[0]

    @property
    def last_block(self) -> BlockKey:
        return self.block_keys[-1]

    def grid(self, latent_shape, factor: int = 1) -> tuple[int, int, int]:
        """Token grid ``(frames, rows, cols)`` of a latent at ``factor`` times the native patch.

        Sizes that do not divide are padded up, as the models (and the coarse step) pad.
        """
        p = self.native_patch * factor
        h, w = latent_shape[-2], latent_shape[-1]
        frames = -(-latent_shape[2] // self.temporal_patch) if len(latent_shape) == 5 else 1
        return frames, -(-h // p), -(-w // p)

    def grid_tokens(self, latent_shape, factor: int = 1) -> int:
        """Image tokens of one sample at ``factor`` times the native patch (spatial coarsening)."""
        t, h, w = self.grid(latent_shape, factor)
        return t * h * w

    # -- the token stream of a block --------------------------------------------------------
    def image_start(self, key: BlockKey, text_tokens: int) -> int:
        """Index of the first image token in block ``key``'s ``img`` stream."""
        return text_tokens if key in self.text_first_blocks else 0

    def image_tokens(self, hidden, count: int, text_tokens: int = 0, key: BlockKey | None = None):
        """The ``count`` grid tokens of block ``key``'s ``img`` stream (default: the last block);
        reference tokens (Kontext) follow them."""
        start = self.image_start(self.last_block if key is None else key, text_tokens)
        return hidden[:, start:start + count]

    def pe_image_start(self, text_tokens: int) -> int:
        """Index of the first image token along ``pe``'s token axis."""
        return text_tokens if self.pe_has_text else 0

    # -- positions of a coarse grid -----------------------------------------------------------
    def coarse_rope_options(self, base: dict | None, factor: int) -> dict:
        """RoPE options that place a ``factor``-times coarser grid on the native grid.

        Coarse token ``j`` covers native tokens ``k*j .. k*j+k-1``; its position is their
        centre ``k*j + (k-1)/2``. Existing options (e.g. a RoPE-scaling node upstream) map
        native positions ``i -> s*i + shift``; we compose with that map.
        """
        opts = dict(base or {})
        for axis in ("x", "y"):
            scale = float(opts.get(f"scale_{axis}", 1.0))
            shift = float(opts.get(f"shift_{axis}", 0.0))
            opts[f"scale_{axis}"] = scale * factor
            opts[f"shift_{axis}"] = shift + scale * (factor - 1) / 2.0
        return opts

    # -- cost ------------------------------------------------------------------------------
    def step_flops(self, image_tokens: int, text_tokens: int, key_tokens: int | None = None) -> float:
        """Approximate transformer FLOPs of one forward per sample (linear layers + attention).

        ``key_tokens``: the computed tokens' self-attention reads that many image tokens'
        keys/values instead of their own (the router's cache of the skipped tokens' keys/values):
        attention grows with queries x keys, the linear layers do not.
        """
        t = text_tokens if self.joint_text else 0
        n = image_tokens + t
        d = self.hidden_size
        linear = 2.0 * self.linear_macs_per_token * n
        attention = 4.0 * n * n * d
        cross = 0.0 if self.joint_text else 4.0 * image_tokens * text_tokens * d
        flops = self.blocks * (linear + attention + cross)
        if key_tokens is not None and key_tokens > image_tokens:
            flops += self.blocks * 4.0 * n * (key_tokens - image_tokens) * d
        return flops
