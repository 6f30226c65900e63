"""Autograd-safe forwards of ComfyUI's own Flux and Wan diffusion models, for training.

Why this exists
---------------
ComfyUI's model code is written for inference. Flux's blocks (``comfy/ldm/flux/layers.py``,
ComfyUI 0.3.75) add their residuals in place::

    img += apply_mod(self.img_attn.proj(img_attn), img_mod1.gate, ...)   # DoubleStreamBlock
    x += apply_mod(output, mod.gate, ...)                                # SingleStreamBlock

``img`` / ``x`` was saved for backward by the block's first LayerNorm, so a plain
``loss.backward()`` through ``Flux.forward`` raises "one of the variables needed for gradient
computation has been modified by an inplace operation". Wrapping each block in non-reentrant
``torch.utils.checkpoint`` (what ``comfy_extras/nodes_train.py`` does) hides the error but is
worse: the recomputation in backward can see a block's input *after* the in-place add, so the
gradients can be silently wrong (docs/design_notes.md section 3: 39 parameter tensors of a tiny float64 Flux
off by 10-23%).

What this module does
---------------------
:func:`flux_forward` runs ComfyUI's own ``Flux.forward`` (its DIFFUSION_MODEL wrappers,
padding, patchify, ``rope_options``, ids, timestep/guidance/vector embeddings, final layer,
unpatchify: all out of place) and swaps only the two block kinds, through ComfyUI's own
``transformer_options["patches_replace"]["dit"]`` hook, for functions below that do the same
math on the block's own submodules and parameters (its Modulation, LayerNorms, qkv/proj
Linears, QK RMSNorms, MLPs, ComfyUI's ``attention`` with RoPE, ``apply_mod``) with
``a = a + b`` instead of ``a += b``. No weights are copied, so ComfyUI weight patches (LoRA
through ``weight_function``) and casts apply as at inference. A ``dit`` replace patch that was
already in ``transformer_options`` still runs, with our block as its ``original_block``.

:func:`wan_forward` runs ``WanModel.forward`` unchanged: in 0.3.75 every residual of
``WanAttentionBlock`` / ``Head`` is already out of place (``torch.addcmul(x, y, gate)``,
``x = x + cross_attn(...)``), which the gradient test in ``tests/test_train_forward.py``
checks against finite differences (t2v and i2v).

Attention is ComfyUI's ``optimized_attention`` as selected by the running process (SDPA on
GPU, sub-quadratic on CPU; both differentiable). Sage/flash-attn builds selected by launch flags
may have no backward.

The block functions mirror ComfyUI 0.3.75. Newer ComfyUI changes these blocks (extra block
kwargs, attention patches): run ``tests/test_train_forward.py`` with ``COMFYUI_PATH`` set to
that checkout before training against it; the equivalence test will fail where they differ.
"""

from __future__ import annotations

import functools

import torch


class UnsupportedTrainingModelError(TypeError):
    """The module is not a plain ComfyUI Flux or WanModel diffusion model."""


def _flux_classes():
    import comfy.ldm.flux.layers as layers
    import comfy.ldm.flux.model as model

    return model.Flux, layers.DoubleStreamBlock, layers.SingleStreamBlock


def _wan_classes():
    import comfy.ldm.wan.model as model

    return model.WanModel, model.WanAttentionBlock


def _double_block(block, img, txt, vec, pe, attn_mask=None, transformer_options={}):
    """``DoubleStreamBlock.forward`` (0.3.75) with out-of-place residual additions."""
    from comfy.ldm.flux.layers import apply_mod
    from comfy.ldm.flux.math import attention

    if block.modulation:
        img_mod1, img_mod2 = block.img_mod(vec)
        txt_mod1, txt_mod2 = block.txt_mod(vec)
    else:  # global modulation (Flux 2): the model passes the modulations in
        (img_mod1, img_mod2), (txt_mod1, txt_mod2) = vec

    def qkv(x, norm1, attn, mod):
        x = attn.qkv(apply_mod(norm1(x), 1 + mod.scale, mod.shift))
        q, k, v = x.view(x.shape[0], x.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.norm(q, k, v)
        return q, k, v

    img_qkv = qkv(img, block.img_norm1, block.img_attn, img_mod1)
    txt_qkv = qkv(txt, block.txt_norm1, block.txt_attn, txt_mod1)
    first, second = (img_qkv, txt_qkv) if block.flipped_img_txt else (txt_qkv, img_qkv)
    attn = attention(*(torch.cat((a, b), dim=2) for a, b in zip(first, second)),
                     pe=pe, mask=attn_mask, transformer_options=transformer_options)
    if block.flipped_img_txt:
        img_attn, txt_attn = attn[:, :img.shape[1]], attn[:, img.shape[1]:]
    else:
        txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]

    def residuals(x, x_attn, attn_mod, norm2, mlp, mod1, mod2):
        x = x + apply_mod(attn_mod.proj(x_attn), mod1.gate)
        return x + apply_mod(mlp(apply_mod(norm2(x), 1 + mod2.scale, mod2.shift)), mod2.gate)

    img = residuals(img, img_attn, block.img_attn, block.img_norm2, block.img_mlp, img_mod1, img_mod2)
    txt = residuals(txt, txt_attn, block.txt_attn, block.txt_norm2, block.txt_mlp, txt_mod1, txt_mod2)
    if txt.dtype == torch.float16:
        txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
    return img, txt


def _single_block(block, x, vec, pe, attn_mask=None, transformer_options={}):
    """``SingleStreamBlock.forward`` (0.3.75) with an out-of-place residual addition."""
    from comfy.ldm.flux.layers import apply_mod
    from comfy.ldm.flux.math import attention

    mod = block.modulation(vec)[0] if block.modulation else vec
    qkv, mlp = torch.split(block.linear1(apply_mod(block.pre_norm(x), 1 + mod.scale, mod.shift)),
                           [3 * block.hidden_size, block.mlp_hidden_dim_first], dim=-1)
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = block.norm(q, k, v)
    attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
    x = x + apply_mod(block.linear2(torch.cat((attn, block.mlp_act(mlp)), 2)), mod.gate)
    if x.dtype == torch.float16:
        x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return x


def _replacement(own, existing):
    """A ``patches_replace["dit"]`` entry running ``own`` (or ``existing`` on top of it)."""
    if existing is None:
        return lambda args, extra: own(args)
    return lambda args, extra: existing(args, {**extra, "original_block": own})


def _check(model, cls, blocks, name):
    """Only the exact stock classes: subclasses (VACE, camera, S2V, ControlNet...) differ."""
    if type(model) is not cls or any(type(b) is not block_cls for b, block_cls in blocks):
        raise UnsupportedTrainingModelError(
            f"{name} expects ComfyUI's {cls.__module__}.{cls.__name__} itself with its stock blocks "
            f"(the diffusion model, e.g. model_patcher.model.diffusion_model), got "
            f"{type(model).__module__}.{type(model).__name__}")


def flux_forward(model, x, timestep, context, y=None, guidance=None, transformer_options=None, **kwargs):
    """``Flux.forward(x, timestep, context, y, guidance, transformer_options=...)``, autograd-safe.

    Same inputs and output as the model's forward (``x`` ``(B, C, H, W)`` -> ``(B, C_out, H, W)``);
    other keyword arguments (``attention_mask``, ``ref_latents``, ...) are passed through.
    ``transformer_options`` is not modified.
    """
    flux_cls, double_cls, single_cls = _flux_classes()
    _check(model, flux_cls, [(b, double_cls) for b in getattr(model, "double_blocks", ())]
           + [(b, single_cls) for b in getattr(model, "single_blocks", ())], "flux_forward")
    opts = dict(transformer_options or {})
    patches_replace = dict(opts.get("patches_replace", {}))
    dit = dict(patches_replace.get("dit", {}))

    for i, block in enumerate(model.double_blocks):
        def own(args, block=block):
            img, txt = _double_block(block, args["img"], args["txt"], args["vec"], args["pe"],
                                     args.get("attn_mask"), args.get("transformer_options") or {})
            return {"img": img, "txt": txt}
        dit[("double_block", i)] = _replacement(own, dit.get(("double_block", i)))
    for i, block in enumerate(model.single_blocks):
        def own(args, block=block):
            return {"img": _single_block(block, args["img"], args["vec"], args["pe"],
                                         args.get("attn_mask"), args.get("transformer_options") or {})}
        dit[("single_block", i)] = _replacement(own, dit.get(("single_block", i)))

    patches_replace["dit"] = dit
    opts["patches_replace"] = patches_replace
    return model.forward(x, timestep, context, y=y, guidance=guidance, transformer_options=opts, **kwargs)


def wan_forward(model, x, timestep, context, clip_fea=None, transformer_options=None, **kwargs):
    """``WanModel.forward(x, timestep, context, clip_fea, transformer_options=...)``, autograd-safe.

    t2v and i2v (``x`` with the image channels concatenated, ``clip_fea`` ``(B, tokens, 1280)``).
    ComfyUI 0.3.75's Wan blocks are already out of place, so this is the model's own forward
    (on a copy of ``transformer_options``), restricted to the stock classes it was checked on.
    """
    wan_cls, block_cls = _wan_classes()
    _check(model, wan_cls, [(b, block_cls) for b in getattr(model, "blocks", ())], "wan_forward")
    return model.forward(x, timestep, context, clip_fea=clip_fea,
                         transformer_options=dict(transformer_options or {}), **kwargs)


def training_forward(model):
    """``flux_forward`` or ``wan_forward`` bound to ``model``; a clear error for anything else."""
    flux_cls, _, _ = _flux_classes()
    wan_cls, _ = _wan_classes()
    if type(model) is flux_cls:
        return functools.partial(flux_forward, model)
    if type(model) is wan_cls:
        return functools.partial(wan_forward, model)
    hint = ""
    if hasattr(model, "diffusion_model") or hasattr(getattr(model, "model", None), "diffusion_model"):
        hint = " (pass the diffusion model itself: model_patcher.model.diffusion_model)"
    raise UnsupportedTrainingModelError(
        f"no autograd-safe training forward for {type(model).__module__}.{type(model).__name__}: "
        f"only ComfyUI's Flux (comfy.ldm.flux.model.Flux) and Wan 2.1 (comfy.ldm.wan.model.WanModel) "
        f"are supported{hint}")
