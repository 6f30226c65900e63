"""One diffusion-model call under a token plan, through the model's own forward.

Bound to ComfyUI's DIFFUSION_MODEL wrapper chain: the call goes to the next executor, so the
model's own (LoRA-patched, quantised, compiled...) layers do the work. In the order of
docs/runtime.md: the latent at the plan's patch size (runtime/coarse.py, shared with the adapter
trainer) -> the model's embed -> the plan's tokens gathered with their positions
(runtime/token_path.py) and merged into groups (runtime/merge_path.py) -> blocks -> unmerged,
the grid restored -> de-embed.
"""

from __future__ import annotations

import inspect

import torch

from ..families.call_args import call_bound
from .block_hooks import chain_block_patches, merge_pairs
from .coarse import coarse_velocity
from .graph_replay import GraphCache, cache_for, graphable
from .merge_path import MergePath
from .token_path import TokenPath
from .token_plan import NATIVE, TokenPlan


def spatial_blocker(bound: inspect.BoundArguments) -> str | None:
    """Why this call cannot leave the native token grid, or None.

    Any extra tensor laid out on the latent grid (ControlNet residuals, I2V frames concatenated
    in time, VACE/reference latents) is indexed by native token position and would not line up
    with a coarse grid or a subset of tokens: such calls run at the native patch size.
    """
    x = bound.arguments["x"]
    if bound.arguments.get("control") is not None:
        return "ControlNet"
    extra = dict(bound.arguments.get("kwargs") or {})
    for name, value in list(bound.arguments.items()) + list(extra.items()):
        if name in ("x", "kwargs", "transformer_options") or value is None:
            continue
        if isinstance(value, torch.Tensor) and value.ndim == x.ndim and value.shape[-2:] == x.shape[-2:]:
            return f"spatial input '{name}'"
    return None


def token_blocker(bound: inspect.BoundArguments) -> str | None:
    """Why this call cannot run a subset of its tokens, beyond :func:`spatial_blocker`, or None."""
    options = bound.arguments.get("transformer_options") or {}
    extra = dict(bound.arguments.get("kwargs") or {})
    if extra.get("timestep_zero_index") is not None or bound.arguments.get("timestep_zero_index") is not None:
        return "per-token timesteps"
    refs = bound.arguments.get("ref_latents", extra.get("ref_latents"))
    if refs is not None and extra.get("ref_latents_method", bound.arguments.get("ref_latents_method")) \
            == "index_timestep_zero":
        # Flux.2 (ComfyUI 0.33) gives reference tokens their own timestep by absolute stream
        # positions (modulation_dims) fixed before the blocks: a subset or merge would shift them
        return "per-token timesteps"
    if (options.get("patches") or {}).get("double_block"):
        return "block patches"  # post-block patches index the full stream
    if bound.arguments.get("attention_mask") is not None or extra.get("attention_mask") is not None:
        return "attention mask"
    return None


def admit(plan: TokenPlan, bound: inspect.BoundArguments, run) -> TokenPlan:
    """``plan``, or the native plan where this call's inputs forbid it (counted in the report)."""
    if plan.is_native:
        return plan
    reason = spatial_blocker(bound)
    if reason is None and bound.arguments["x"].ndim != run.binding.latent_ndim:
        reason = f"{bound.arguments['x'].ndim}-d latent"
    if reason is None and plan.selects_tokens:
        reason = token_blocker(bound)
    if reason is None and plan.merge is not None:
        entering = (plan.keep.shape[-1] if plan.keep is not None
                    else run.binding.grid_tokens(bound.arguments["x"].shape, plan.factor))
        if plan.merge.groups.numel() != entering:
            reason = "merge pattern of another grid"
    if reason is not None:
        run.fallback(reason)
        return NATIVE
    return plan


def call_with_plan(executor, bound: inspect.BoundArguments, plan: TokenPlan, run) -> torch.Tensor:
    """Evaluate the model under ``plan`` (already :func:`admit`-ted) and return a full-size output."""
    if plan.is_native:
        return call_bound(executor, bound)
    binding = run.binding
    x = bound.arguments["x"]
    options = bound.arguments["transformer_options"]
    grid = binding.grid_tokens(x.shape, plan.factor)
    pairs = []
    if plan.keep is not None:
        fill = None
        if plan.fill is not None:
            call_options = options
            fill = lambda grid, keep: plan.fill(grid, keep, call_options)  # noqa: E731
        pairs.append(TokenPath(binding, plan.keep, grid, run.fallback, fill).block_patches())
    if plan.merge is not None:  # groups the tokens that enter the blocks (the kept ones, in order)
        entering = grid if plan.keep is None else plan.keep.shape[-1]
        unmerge = plan.merge.unmerge
        if unmerge in VELOCITY_UNMERGE and (plan.keep is not None or plan.factor != 1):
            unmerge = "residual"  # the velocity correction is made for the native full grid only
        pairs.append(MergePath(binding, plan.merge, entering, run.fallback, plan.merge.proportional,
                               unmerge=unmerge).block_patches())
    if pairs:
        options = chain_block_patches(options, merge_pairs(*pairs))
    if plan.keep is not None and plan.attention is not None:
        options = plan.attention(options)
    if plan.factor == 1:
        bound.arguments["transformer_options"] = options
        if plan.merge is not None and plan.merge.unmerge in VELOCITY_UNMERGE and plan.keep is None:
            return _merged_velocity(executor, bound, x, run.sigma_of(bound.arguments["timestep"]), plan.merge,
                                    binding, run.t_per_sigma)
        return call_bound(executor, bound)
    return _coarse(executor, bound, plan, run, options)


def _coarse(executor, bound: inspect.BoundArguments, plan: TokenPlan, run, options: dict) -> torch.Tensor:
    x = bound.arguments["x"]
    timestep = bound.arguments["timestep"]
    sigma = run.sigma_of(timestep).to(x.device)
    factor = plan.factor
    adapter = plan.coarse_adapter
    graphs = _graphs(executor, bound, plan, run)

    def call(x_small, timestep_small, options_small):
        bound.arguments["x"] = x_small
        bound.arguments["timestep"] = timestep_small
        bound.arguments["transformer_options"] = options_small
        if graphs is not None:
            return graphs.call(factor, bound, lambda b: call_bound(executor, b))
        return call_bound(executor, bound)

    part = lora = None
    if adapter is not None:
        run.report.adapter_calls += 1
        part = adapter.part(factor, x.device)
        lora = adapter.lora_context(executor.class_obj, factor, x.device, x.dtype)
    return coarse_velocity(call, x, sigma, timestep.dtype, factor, run.binding, run.t_per_sigma, options,
                           coarse_embed=plan.coarse_embed, coarse_deembed=plan.coarse_deembed, part=part,
                           strength=adapter.strength if adapter else 1.0, lora=lora)


def _graphs(executor, bound, plan: TokenPlan, run) -> GraphCache | None:
    """The model's CUDA graph cache where this coarse call may be replayed as a graph, else None."""
    if not run.cuda_graphs:
        return None
    if plan.coarse_adapter is not None or plan.selects_tokens:
        run.note("CUDA graphs are not used for steps with a patch adapter or a token subset (yet)")
        return None
    x = bound.arguments["x"]
    model_class = type(executor.class_obj).__qualname__
    if not x.is_cuda or model_class in GraphCache.uncapturable or not graphable(bound.arguments):
        return None
    if run.graphs is None:
        run.graphs = cache_for(executor.class_obj)
        run.graph_replays_before = run.graphs.replays
    return run.graphs


VELOCITY_UNMERGE = ("velocity", "renoise", "sigma")


def _merged_velocity(executor, bound, x: torch.Tensor, sigma: torch.Tensor, pattern, binding,
                     t_per_sigma: float = 1.0) -> torch.Tensor:
    """A merged call whose every token's clean estimate ``x - sigma v`` is its group's and whose
    noise stays its own (as a coarse step keeps the fine noise: runtime/coarse.py).

    The model runs on ``x_in``: each group's mean input patch (``renoise``: plus fresh noise of
    std ``sigma * sqrt(1 - 1/|S|)``, so a mean of |S| noisy tokens is back at the noise level its
    timestep says; deterministic per step). A token's velocity is its group's plus
    ``(x - x_in) / sigma``. ``sigma``: where every group has one size |S|, the mean input is put
    back on the flow path as a coarse step's pooled latent is (kernels/flow.py: noise gain
    1/sqrt(|S|), rescaled input, the model asked at the lower sigma'); other patterns renoise.
    """
    from ..kernels.patchify import pad_to_multiple, patchify, unpatchify
    from ..kernels.token_select import unmerge
    from .merge_path import group_mean, pattern_on

    c = binding.latent_channels
    p = binding.native_patch
    patch = (binding.temporal_patch, p, p) if x.ndim == 5 else p
    padded, (h, w) = pad_to_multiple(x[:, :c].float(), p)
    tokens, grid = patchify(padded, patch)
    groups, sizes, _, _ = pattern_on(pattern, tokens.device)  # no bincount: no device sync
    s = sigma.float().clamp_min(1e-6).to(x.device)
    mean = group_mean(tokens, groups, sizes, 1)
    mode = pattern.unmerge
    size = _uniform_size(pattern)
    if mode == "sigma" and size is None:
        mode = "renoise"
    s_in = s
    if mode == "sigma":
        gain = size ** -0.5
        scale = 1.0 / ((1.0 - s) + s * gain)
        mean = mean * scale.view(-1, 1, 1)
        s_in = s * gain * scale
        bound.arguments["timestep"] = (s_in * t_per_sigma).to(bound.arguments["timestep"].dtype)
    if mode == "renoise":
        gen = torch.Generator(device=x.device).manual_seed(int(float(s.max()) * 1e6) + 7919)
        noise = torch.randn(mean.shape, generator=gen, device=x.device, dtype=torch.float32)
        mean = mean + noise * (1.0 - 1.0 / sizes).sqrt().view(1, -1, 1) * s.view(-1, 1, 1)
    x_in = unpatchify(unmerge(mean, groups), grid, patch)[..., :h, :w]
    bound.arguments["x"] = torch.cat([x_in.to(x.dtype), x[:, c:]], 1) if x.shape[1] > c else x_in.to(x.dtype)
    v = call_bound(executor, bound)
    shape = (-1,) + (1,) * (x.ndim - 1)
    if mode == "sigma":
        x0 = x_in - s_in.view(shape) * v.float()  # the group's clean estimate, at the sigma it was asked at
        return ((x[:, :c].float() - x0) / s.view(shape)).to(v.dtype)
    return (v.float() + (x[:, :c].float() - x_in) / s.view(shape)).to(v.dtype)  # groups of one: v exactly


def _uniform_size(pattern) -> int | None:
    """The one group size of a pattern whose groups all have it, else None (cached on the pattern)."""
    cached = getattr(pattern, "_uniform", "unset")
    if cached == "unset":
        sizes = torch.bincount(pattern.groups.detach().cpu().long(), minlength=pattern.count)
        cached = int(sizes[0]) if bool((sizes == sizes[0]).all()) else None
        object.__setattr__(pattern, "_uniform", cached)
    return cached
