"""Autograd-safe forwards of ComfyUI's own Flux and Wan diffusion models, for training.

Why this exists
---------------
ComfyUI's model code is written for inference. Flux's blocks (``comfy/ldm/flux/layers.py``,
ComfyUI 0.3.75 and 0.33) add their residuals in place::

    img += apply_mod(self.img_attn.proj(img_attn), img_mod1.gate, ...)   # DoubleStreamBlock
    x += apply_mod(output, mod.gate, ...)                                # SingleStreamBlock

``img`` / ``x`` was saved for backward by the block's first LayerNorm, so a plain
``loss.backward()`` through ``Flux.forward`` raises "one of the variables needed for gradient
computation has been modified by an inplace operation". Wrapping each block in non-reentrant
``torch.utils.checkpoint`` (what ``comfy_extras/nodes_train.py`` does) hides the error but is
worse: the recomputation in backward can see a block's input *after* the in-place add, so the
gradients can be silently wrong (DESIGN.md section 4: 39 parameter tensors of a tiny float64 Flux
off by 10-23%).

What this module does
---------------------
It runs ComfyUI's own forward and ComfyUI's own blocks, unchanged (no block math is copied, so
block details that differ between versions -- ``flipped_img_txt`` in 0.3.75, the gated
``yak_mlp``, ``modulation_dims_*`` and attention patches in 0.33 -- are whatever the running
ComfyUI does). Each block is entered through ComfyUI's own
``transformer_options["patches_replace"]["dit"]`` hook and runs under
``torch.autograd.graph.saved_tensors_hooks`` that make its in-place residual adds harmless:

* a tensor saved for backward that shares storage with the block's input streams (``img``,
  ``txt``: the tensors the block adds into) is saved as a copy taken when it was saved, i.e. the
  value the op really used (the memory is what out-of-place adds would keep alive anyway);
* every other saved tensor is kept as is, with its version; if it was modified in place before
  backward reads it, backward raises the same "modified by an inplace operation" error as
  without the hooks (the hooks would otherwise skip that check), so nothing can go silently wrong.

No weights are copied, so ComfyUI weight patches (LoRA through ``weight_function``) and casts
apply as at inference. A ``dit`` replace patch that was already in ``transformer_options`` still
runs, with the protected block as its ``original_block``.

While a training forward runs, ``comfy.model_management.in_training`` is set (where the running
ComfyUI has it, 0.33), as ComfyUI's own training node does: RoPE then runs in plain torch ops
instead of comfy_kitchen's fused kernels, which have no backward and no float64.

:func:`wan_forward` does the same for ``WanModel`` (its blocks are out of place in 0.3.75 and
0.33, so the hooks find nothing to copy; they stay as a guard). The gradient tests in
``tests/test_train_forward.py`` check both against finite differences, on every ComfyUI version
the test command runs.

Attention is ComfyUI's ``optimized_attention`` as selected by the running process (SDPA on
GPU, sub-quadratic on CPU; both differentiable). Sage/flash-attn builds selected by launch flags
may have no backward.
"""

from __future__ import annotations

import contextlib
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


class _SavedCopies:
    """``saved_tensors_hooks`` for one block call: copies of saved tensors that alias ``streams``."""

    def __init__(self, streams):
        self.storages = {t.untyped_storage().data_ptr() for t in streams if isinstance(t, torch.Tensor)}

    def pack(self, t):
        try:
            aliased = t.untyped_storage().data_ptr() in self.storages
        except (RuntimeError, NotImplementedError, TypeError):  # a storage-less subclass (quantised weights)
            return t.detach(), None
        if aliased:
            return t.detach().clone(), None
        return t.detach(), t._version  # detach shares the version counter

    @staticmethod
    def unpack(packed):
        t, version = packed
        if version is not None and t._version != version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: a tensor of shape {tuple(t.shape)} inside a block run by the training forward "
                f"(version {t._version}, saved at version {version}); families/autograd_forward.py copies "
                "only tensors that alias the block's input streams")
        return t


def _protected(original_block, stream_keys):
    """``original_block`` (ComfyUI's ``block_wrap``) run under :class:`_SavedCopies` hooks."""
    def run(args):
        if not torch.is_grad_enabled():
            return original_block(args)
        saved = _SavedCopies(args.get(k) for k in stream_keys)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            return original_block(args)
    return run


@contextlib.contextmanager
def _in_training():
    """``comfy.model_management.in_training = True`` for the call (ComfyUI versions that have it)."""
    import comfy.model_management as mm

    if not hasattr(mm, "in_training"):
        yield
        return
    before = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = before


def _replacement(stream_keys, existing):
    """A ``patches_replace["dit"]`` entry running ComfyUI's block protected (see :class:`_SavedCopies`),
    or ``existing`` with the protected block as its ``original_block``."""
    def patch(args, extra):
        own = _protected(extra["original_block"], stream_keys)
        if existing is None:
            return own(args)
        return existing(args, {**extra, "original_block": own})
    return patch


def _with_protected_blocks(transformer_options, keys):
    """A copy of ``transformer_options`` whose ``dit`` patches protect the blocks ``keys``
    (``{key: stream names}``); the caller's dicts are not modified."""
    opts = dict(transformer_options or {})
    patches_replace = dict(opts.get("patches_replace", {}))
    dit = dict(patches_replace.get("dit", {}))
    for key, streams in keys.items():
        dit[key] = _replacement(streams, dit.get(key))
    patches_replace["dit"] = dit
    opts["patches_replace"] = patches_replace
    return opts


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
    keys = {("double_block", i): ("img", "txt") for i in range(len(model.double_blocks))}
    keys.update({("single_block", i): ("img",) for i in range(len(model.single_blocks))})
    opts = _with_protected_blocks(transformer_options, keys)
    with _in_training():
        return model.forward(x, timestep, context, y=y, guidance=guidance, transformer_options=opts, **kwargs)


def wan_forward(model, x, timestep, context, clip_fea=None, transformer_options=None, **kwargs):
    """``WanModel.forward(x, timestep, context, clip_fea, transformer_options=...)``, autograd-safe.

    t2v and i2v (``x`` with the image channels concatenated, ``clip_fea`` ``(B, tokens, 1280)``).
    ComfyUI's Wan blocks are out of place (0.3.75, 0.33); they run protected all the same, on a
    copy of ``transformer_options``, restricted to the stock classes this was checked on.
    """
    wan_cls, block_cls = _wan_classes()
    _check(model, wan_cls, [(b, block_cls) for b in getattr(model, "blocks", ())], "wan_forward")
    opts = _with_protected_blocks(transformer_options, {("double_block", i): ("img",)
                                                        for i in range(len(model.blocks))})
    with _in_training():
        return model.forward(x, timestep, context, clip_fea=clip_fea, transformer_options=opts, **kwargs)


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
