"""What the pack needs to know about a model family, and nothing more.

Every idea in the pack runs one code path; Flux and Wan differ only in this small record:
the native spatial patch, the latent channels, how positions of a coarse grid are told to
the model's RoPE (both read ``transformer_options["rope_options"]``), and the numbers used
to estimate transformer FLOPs for the log.
"""

from __future__ import annotations

from dataclasses import dataclass


class UnsupportedModelError(ValueError):
    """The MODEL is not one the pack knows how to re-patch."""


@dataclass(frozen=True)
class FamilyBinding:
    family: str              # "flux" or "wan"
    native_patch: int        # spatial patch size of the model (latent cells per token side)
    latent_channels: int     # noisy channels of x (image conditioning may follow)
    latent_ndim: int         # 4 for images (B,C,H,W), 5 for video (B,C,T,H,W)
    temporal_patch: int      # tokens per latent frame (1 for images)
    hidden_size: int
    blocks: int              # transformer blocks each image token passes through
    linear_macs_per_token: int   # multiply-adds per token per block in the linear layers
    joint_text: bool         # text tokens share the self-attention (Flux) or only cross-attend (Wan)
    # where patch adapters hook in (``transformer_options["patches_replace"]["dit"]`` keys)
    first_block: tuple = ("double_block", 0)
    last_block: tuple = ("double_block", 0)
    last_block_has_text: bool = False    # Flux single blocks carry [text, image] tokens in "img"
    fingerprint_names: tuple = ()        # weights that identify the base model (adapters/patch_adapter.py)
    feed_forward: tuple = ()             # the feed-forward Linear layers (LoRA targets of adapters)

    def image_tokens(self, hidden, count: int, text_tokens: int = 0):
        """The ``count`` grid tokens of a block's ``img`` stream (reference tokens follow them)."""
        start = text_tokens if self.last_block_has_text else 0
        return hidden[:, start:start + count]

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

    def step_flops(self, image_tokens: int, text_tokens: int) -> float:
        """Approximate transformer FLOPs of one forward per sample (linear layers + attention)."""
        n = image_tokens + (text_tokens if self.joint_text else 0)
        d = self.hidden_size
        linear = 2.0 * self.linear_macs_per_token * n
        attention = 4.0 * n * n * d
        cross = 0.0 if self.joint_text else 4.0 * image_tokens * text_tokens * d
        return self.blocks * (linear + attention + cross)


def _flux_binding(dm, latent_channels: int) -> FamilyBinding:
    p = dm.params
    d = dm.hidden_size
    mlp = int(d * p.mlp_ratio)
    # double block, per stream: qkv 3d^2 + proj d^2 + mlp 2*d*mlp; single block: the same, fused
    macs = 4 * d * d + 2 * d * mlp
    n_double, n_single = len(dm.double_blocks), len(dm.single_blocks)
    first = ("double_block", 0) if n_double else ("single_block", 0)
    last = ("single_block", n_single - 1) if n_single else ("double_block", n_double - 1)
    ff = tuple(f"double_blocks.{i}.img_mlp.{j}" for i in range(n_double) for j in (0, 2))
    ff += tuple(f"single_blocks.{i}.{name}" for i in range(n_single) for name in ("linear1", "linear2"))
    tail = f"single_blocks.{n_single - 1}.linear2.weight" if n_single else f"double_blocks.{n_double - 1}.img_mlp.2.weight"
    head = f"double_blocks.0.img_attn.qkv.weight" if n_double else "single_blocks.0.linear1.weight"
    return FamilyBinding("flux", int(dm.patch_size), latent_channels, 4, 1, d, n_double + n_single, macs, True,
                         first, last, bool(n_single),
                         ("img_in.weight", head, tail, "final_layer.linear.weight"), ff)


def _wan_binding(dm, latent_channels: int) -> FamilyBinding:
    pt, ph, pw = (int(v) for v in dm.patch_size)
    if ph != pw:
        raise UnsupportedModelError(f"Wan model with non-square patch {dm.patch_size} is not supported")
    d = dm.dim
    # self-attn qkvo 4d^2, cross-attn q and o 2d^2, ffn 2*d*ffn
    macs = 6 * d * d + 2 * d * dm.ffn_dim
    n = len(dm.blocks)
    ff = tuple(f"blocks.{i}.ffn.{j}" for i in range(n) for j in (0, 2))
    return FamilyBinding("wan", ph, latent_channels, 5, pt, d, n, macs, False,
                         ("double_block", 0), ("double_block", n - 1), False,
                         ("patch_embedding.weight", "blocks.0.self_attn.q.weight", f"blocks.{n - 1}.ffn.2.weight",
                          "head.head.weight"), ff)


def binding_for(model_patcher) -> FamilyBinding:
    """Return the binding for a ComfyUI ModelPatcher, or raise :class:`UnsupportedModelError`.

    Reads the model; never changes it.
    """
    import comfy.model_sampling
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.wan.model import WanModel

    base = getattr(model_patcher, "model", None)
    dm = getattr(base, "diffusion_model", None)
    name = type(dm).__name__ if dm is not None else type(base).__name__
    channels = getattr(getattr(base, "latent_format", None), "latent_channels", None)
    if isinstance(dm, Flux):
        binding = _flux_binding(dm, channels or 16)
    elif isinstance(dm, WanModel):
        binding = _wan_binding(dm, channels or 16)
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
