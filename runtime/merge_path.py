"""Run merged image tokens through the blocks, and give every token its group's output after them.

Installed for one model call as chained block hooks (runtime/block_hooks.py), beside (inside) the
token path of a token subset (runtime/token_path.py), on every block:

* first block, before: the image tokens that enter the blocks (the whole grid, or the kept
  tokens in their order) become one token per group of the plan's :class:`MergePattern`: their
  mean (``index_add``, no dense N x K matrix); text and reference tokens around them stay;
* every block, before: the positions are merged the same way, once per call. Both families hand
  each block RoPE rotation matrices (Flux ``pe`` ``[..., d/2, 2, 2]`` for ``[text, image]``, Wan
  ``freqs`` for the image); a group's rotation is the mean of its members' rotations renormalised
  to a rotation (the circular mean of the angles; exact where members agree). A per-token
  modulation ``vec`` is averaged too. With proportional attention (on by default), the block's
  ``transformer_options`` get an ``optimized_attention_override`` (wrapping one already there;
  the model's own options are never changed, so nothing needs restoring) that adds log|S_j| to
  the logits of merged key j: a merged key counts as many tokens as it holds (ToMe / LGM);
* last block, after: every token gets its group's output (a copy, ``index_select``); then, how
  the output goes back to the tokens (``unmerge``):

  - ``velocity`` (default; runtime/execute.py): each token's velocity is its group's plus
    ``(x_i - mean_group(x)) / sigma``: its clean estimate ``x - sigma v`` is its group's, its noise
    its own, as a coarse step of the patch schedule keeps the fine noise;
  - ``renoise``: the same, the model's input being each group's mean patch plus fresh noise back
    to the step's noise level (a mean of |S| noisy tokens is less noisy than sigma says);
  - ``residual``: the hidden state of each token gets its own deviation from the group mean before
    the blocks (h_out = h_in + the group's update; also used for merged kept tokens of a subset);
  - ``copy``: the group's output alone. Every member of a group gets one velocity, losing each
    token's own noise, which the flow-matching velocity carries: images keep their noise.

  On the image proxy (CPU, n = 32, LPIPS to the baseline at ratio 0.5): copy 0.82, residual 0.35,
  velocity 0.26, renoise 0.26 (FID 517 / 468 / 271 / 272; baseline 158).

The key bias is one extra q/k dimension (q: a constant, k: log|S_j|; v: zeros, its output
dropped), padded to 8 so fused SDPA / flash kernels still apply, with q rescaled so the logits
keep the model's own scale; :func:`proportional_attention` can also add it as an additive mask.
Where every group has one member, or (Wan: no text among the keys) every group has one size,
the bias is a constant on every logit: there is none, and no override.
"""

from __future__ import annotations

import math
import weakref

import torch

from ..families import FamilyBinding
from ..kernels.token_select import unmerge
from .block_hooks import stream_patches
from .token_path import stream_layout_problem

PAD = 8  # extra head dims for the key bias (fused kernels want multiples of 8)
UNMERGE_MODES = ("velocity", "renoise", "sigma", "residual", "copy")  # velocity / renoise: copy here, the executor
                                                              # corrects the velocity (runtime/execute.py)
_ON_DEVICE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # pattern -> {device: tensors}


def pattern_on(pattern, device) -> tuple:
    """``(groups, sizes as float32, log sizes, any group > 1)`` of ``pattern`` on ``device``, once per
    pattern and device from the pattern's CPU groups (no device sync in a call)."""
    per = _ON_DEVICE.setdefault(pattern, {})
    key = str(device)
    if key not in per:
        groups = pattern.groups.detach().to("cpu", torch.long)
        sizes = torch.bincount(groups, minlength=pattern.count).float()
        per[key] = (groups.to(device), sizes.to(device), sizes.log().to(device), bool((sizes > 1).any()))
    return per[key]


def _uniform(pattern) -> bool:
    """Every group of ``pattern`` has one size (computed on the CPU once per pattern)."""
    cached = getattr(pattern, "_one_size", None)
    if cached is None:
        sizes = torch.bincount(pattern.groups.detach().cpu().long(), minlength=pattern.count)
        cached = bool((sizes == sizes[0]).all())
        object.__setattr__(pattern, "_one_size", cached)
    return cached


def group_mean(x: torch.Tensor, groups: torch.Tensor, sizes: torch.Tensor, dim: int) -> torch.Tensor:
    """Group means along ``dim`` (``index_add`` in float32; ``sizes`` precomputed, so no
    ``bincount`` and no device sync). Groups of one give their member back bit for bit."""
    shape = list(x.shape)
    shape[dim] = sizes.numel()
    sums = torch.zeros(shape, device=x.device, dtype=torch.float32).index_add_(dim, groups, x.float())
    view = [1] * x.ndim
    view[dim] = sizes.numel()
    return (sums / sizes.view(view)).to(x.dtype)


# -- math (pure torch) -------------------------------------------------------------------------
def merge_rotations(pe: torch.Tensor, groups: torch.Tensor, count: int, dim: int,
                    sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Group means of RoPE rotation matrices ``[..., 2, 2]`` along ``dim``, renormalised to rotations.

    ``[[cos, -sin], [sin, cos]]`` averaged is ``r * R(mean angle)``; dividing by ``r`` gives the
    rotation by the circular mean of the members' angles. Singleton groups keep their matrices
    bit for bit.
    """
    groups = groups.to(pe.device, torch.long)
    if sizes is None:
        sizes = torch.bincount(groups, minlength=count)
    sizes = sizes.to(pe.device, torch.float32)
    merged = group_mean(pe, groups, sizes, dim)
    norm = torch.sqrt(merged[..., 0, 0].float() ** 2 + merged[..., 1, 0].float() ** 2).clamp_min(1e-12)
    if sizes is not None:
        view = [1] * norm.ndim
        view[dim] = count
        norm = torch.where(sizes.view(view) > 1, norm, torch.ones_like(norm))
    return (merged.float() / norm[..., None, None]).to(pe.dtype)


def _split_heads(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    if skip_reshape:
        return t
    b, n, hd = t.shape
    return t.view(b, n, heads, hd // heads).transpose(1, 2)


def proportional_attention(func, q, k, v, heads, bias: torch.Tensor, *, skip_reshape=False,
                           skip_output_reshape=False, method: str = "extra_dim", call=None, **kwargs):
    """``func``'s attention with ``bias`` (one value per key, shape ``(keys,)``) added to every
    query's logits, through ``call(func, q, k, v, heads, **kw)`` (default: ``func`` itself; an
    override already present goes there). ``method``: ``"extra_dim"`` (fused kernels still apply)
    or ``"mask"`` (an additive mask)."""
    call = call or (lambda f, *a, **kw: f(*a, **kw))
    qh, kh, vh = (_split_heads(t, heads, skip_reshape) for t in (q, k, v))
    b, h, lq, d = qh.shape
    bias = bias.to(device=q.device)
    if method == "mask":
        mask = bias.to(q.dtype).view(1, 1, 1, -1)
        if kwargs.get("mask") is not None:
            mask = kwargs["mask"] + mask
        kwargs["mask"] = mask
        return call(func, q, k, v, heads, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape,
                    **kwargs)
    if method != "extra_dim":
        raise ValueError(f"proportional attention method must be 'extra_dim' or 'mask', got {method!r}")
    lk = kh.shape[2]
    width = d + PAD
    q2 = q.new_empty(b, h, lq, width)
    torch.mul(qh, math.sqrt(width / d), out=q2[..., :d])  # keeps the model's 1/sqrt(d) logit scale
    q2[..., d:] = 0
    q2[..., d] = math.sqrt(width)                         # q2 . k2 / sqrt(width) adds the bias
    k2 = k.new_empty(b, h, lk, width)
    k2[..., :d] = kh
    k2[..., d:] = 0
    k2[..., d] = bias.to(k.dtype).view(1, 1, lk)
    v2 = v.new_empty(b, h, lk, width)
    v2[..., :d] = vh
    v2[..., d:] = 0
    out = call(func, q2, k2, v2, heads, skip_reshape=True, skip_output_reshape=True, **kwargs)
    out = out[..., :d]
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(b, lq, h * d)


def _attention_args(args, kwargs):
    """``(q, k, v, heads, rest kwargs)`` of an attention call (ComfyUI's signature:
    ``func(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, ...)``)."""
    names = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")
    bound = dict(zip(names, args))
    if len(args) > len(names):
        return None
    for name in names:
        if name in kwargs:
            bound[name] = kwargs.pop(name)
    if not all(n in bound for n in ("q", "k", "v", "heads")):
        return None
    q, k, v, heads = (bound.pop(n) for n in ("q", "k", "v", "heads"))
    return q, k, v, heads, {**kwargs, **bound}


# -- the hooks ----------------------------------------------------------------------------------
class MergePath:
    """Merge ``tokens`` image tokens (those that enter the blocks) by ``pattern`` for one call."""

    def __init__(self, binding: FamilyBinding, pattern, tokens: int, on_fallback=None,
                 proportional: bool = True, method: str = "extra_dim", unmerge: str = "residual"):
        self.binding = binding
        self.pattern = pattern
        self.tokens = tokens
        self.on_fallback = on_fallback or (lambda reason: None)
        self.proportional = proportional
        self.method = method
        if unmerge not in UNMERGE_MODES:
            raise ValueError(f"unmerge must be one of {UNMERGE_MODES}, got {unmerge!r}")
        self.unmerge = unmerge
        self._residual = None
        self.active = False
        self.done = False
        self._pe_in = self._pe_out = None
        self._pending = False   # the next attention call is this block's self-attention
        self.biased_calls = 0

    def block_patches(self) -> dict:
        b = self.binding
        return stream_patches(b.block_keys, b.first_block, b.last_block, self._first, self._before, self._last)

    def _first(self, args: dict) -> dict:
        if self.done:
            self.active = False
            return args
        self.done = True
        b = self.binding
        img = args["img"]
        txt = args.get("txt")
        text = txt.shape[1] if isinstance(txt, torch.Tensor) and txt.ndim == 3 else 0
        start = b.image_start(b.first_block, text)
        reason = self._layout_problem(img, args.get("pe"), start, text)
        if reason is not None:
            self.on_fallback(reason)
            return args
        self.active = True
        p = self.pattern
        self._text, self._stream = text, img.shape[1]
        self._groups, self._sizes, logs, merges = pattern_on(p, img.device)
        self._extra = img.shape[1] - start - self.tokens      # reference tokens after the grid
        self._bias = None
        keys = text if b.joint_text else 0
        # no bias where it cannot change the softmax: groups of one only, or (Wan) every key a
        # merged image token of one size |S| (a constant on every logit)
        uniform = keys == 0 and self._extra == 0 and _uniform(p)
        if self.proportional and merges and not uniform:
            self._bias = torch.cat([logs.new_zeros(keys), logs, logs.new_zeros(self._extra)])
        merged = self._merge_stream(img, start)
        if self.unmerge == "residual":  # each token's own deviation from its group's mean
            n, k = self.tokens, self.pattern.count
            full = img[:, start:start + n]
            self._residual = full - unmerge(merged[:, start:start + k], self._groups, 1)
        return self._before({**args, "img": merged})

    def _merge_stream(self, x: torch.Tensor, start: int, dim: int = 1) -> torch.Tensor:
        n = self.tokens
        head = x.narrow(dim, 0, start)
        body = group_mean(x.narrow(dim, start, n), self._groups, self._sizes, dim)
        tail = x.narrow(dim, start + n, x.shape[dim] - start - n)
        return torch.cat([head, body, tail], dim)

    def _layout_problem(self, img, pe, start: int, text: int) -> str | None:
        tokens = stream_layout_problem(self.binding, img, None, start, text, self.tokens)  # checked first
        if tokens is not None:
            return tokens
        if self.pattern.groups.numel() != self.tokens:
            return "merge pattern of another grid"
        return stream_layout_problem(self.binding, img, pe, start, text, self.tokens, rotations=True)

    def _before(self, args: dict) -> dict:
        if not self.active:
            return args
        out = dict(args)
        pe = args.get("pe")
        b = self.binding
        if isinstance(pe, torch.Tensor):
            if pe is not self._pe_in:
                axis, start = b.pe_token_axis, b.pe_image_start(self._text)
                n, k = self.tokens, self.pattern.count
                head = pe.narrow(axis, 0, start)
                body = merge_rotations(pe.narrow(axis, start, n), self._groups, k, axis, self._sizes)
                tail = pe.narrow(axis, start + n, pe.shape[axis] - start - n)
                self._pe_in, self._pe_out = pe, torch.cat([head, body, tail], axis)
            out["pe"] = self._pe_out
        vec = args.get("vec")
        if isinstance(vec, torch.Tensor) and vec.ndim >= 3 and vec.shape[1] == self._stream:
            out["vec"] = self._merge_stream(vec, 0)  # per-token modulation (Wan 2.2 TI2V)
        if self._bias is not None:
            options = args.get("transformer_options")
            options = dict(options) if isinstance(options, dict) else {}
            options["optimized_attention_override"] = self._override(options.get("optimized_attention_override"))
            out["transformer_options"] = options
            self._pending = True
        return out

    def _override(self, existing):
        def override(func, *args, **kwargs):
            call = existing if existing is not None else (lambda f, *a, **kw: f(*a, **kw))
            if not self._pending:  # cross-attention (Wan) or a second call: not ours
                return call(func, *args, **kwargs)
            self._pending = False
            parsed = _attention_args(args, dict(kwargs))
            if parsed is None:
                return call(func, *args, **kwargs)
            q, k, v, heads, rest = parsed
            skip = bool(rest.get("skip_reshape", False))
            keys = k.shape[2] if skip else k.shape[1]
            queries = q.shape[2] if skip else q.shape[1]
            if keys != self._bias.numel() or queries != keys:
                return call(func, *args, **kwargs)
            rest.pop("skip_reshape", None)
            out_skip = bool(rest.pop("skip_output_reshape", False))
            self.biased_calls += 1
            return proportional_attention(func, q, k, v, heads, self._bias, skip_reshape=skip,
                                          skip_output_reshape=out_skip, method=self.method, call=call, **rest)
        return override

    def _last(self, out: dict) -> dict:
        if not self.active:
            return out
        self.active = False
        b = self.binding
        img = out["img"]
        start = b.image_start(b.last_block, self._text)
        k = self.pattern.count
        body = unmerge(img[:, start:start + k], self._groups, 1)
        if self._residual is not None:
            body = body + self._residual.to(body.dtype)
            self._residual = None
        return {**out, "img": torch.cat([img[:, :start], body, img[:, start + k:]], 1)}
