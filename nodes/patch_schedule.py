"""Dynamic patch scheduling hooked into ComfyUI's sampling loop through chainable wrappers.

* OUTER_SAMPLE wrapper: makes a fresh :class:`ScheduleRun` for the run, moves our
  DIFFUSION_MODEL wrapper to the innermost place (so caches such as EasyCache, applied in any
  order, see full-size inputs and outputs and can skip our coarse calls too), logs the result.
* APPLY_MODEL wrapper: hands the sampler's own latent to the run, in full precision, before
  ComfyUI casts it to the model's dtype (a bf16 latent's rounding noise would swamp the
  trajectory's third difference and make every step look detailed).
* DIFFUSION_MODEL wrapper: maps the call to its step, decides / reuses that step's patch size
  and either passes through untouched (native) or runs :func:`run_coarse`.

Nothing here replaces a model method or touches the input ModelPatcher: the node clones it.
"""

from __future__ import annotations

import logging
import time

import comfy.patcher_extension as pe
import torch

from ..adapters.bindings import FamilyBinding, binding_for
from ..adapters.call_args import bind_call
from .adapter_attach import ADAPTER_KEY, AdapterHolder
from .coarse_step import run_coarse, spatial_blocker
from .graph_replay import GraphCache, cache_for, drop_if_stale, graphable
from .schedule_config import PatchScheduleConfig
from .schedule_run import RunReport, ScheduleRun

WRAPPER_KEY = "elastic_tokens.patch_schedule"
HOLDER_KEY = "elastic_tokens_patch_schedule"
RUN_KEY = "elastic_tokens_patch_schedule_run"

log = logging.getLogger("elastic_tokens")


class PatchScheduleHolder:
    """The node's settings as stored on the cloned model; ``last_report`` is the latest run."""

    def __init__(self, config: PatchScheduleConfig, binding: FamilyBinding):
        self.config = config
        self.binding = binding
        self.last_report: RunReport | None = None


def apply_patch_schedule(model, config: PatchScheduleConfig):
    """Return a clone of ``model`` (a ModelPatcher) that samples with the dynamic patch schedule.

    Raises :class:`~elastic_tokens.adapters.bindings.UnsupportedModelError` for models other
    than Flux / Wan flow models. Applying it twice replaces the settings (no double wrapping).
    """
    binding = binding_for(model)
    patched = model.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    already = HOLDER_KEY in options
    options[HOLDER_KEY] = PatchScheduleHolder(config, binding)
    if not already:
        patched.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample_wrapper)
        patched.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, apply_model_wrapper)
        patched.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, diffusion_model_wrapper)
        patched.add_callback_with_key(pe.CallbacksMP.ON_DETACH, WRAPPER_KEY, _drop_graphs_on_unload)
    return patched


def _drop_graphs_on_unload(patcher, *args) -> None:
    """ComfyUI detached the model: free captured graphs whose weights have moved."""
    drop_if_stale(patcher.model.diffusion_model)


def _make_innermost(transformer_options: dict) -> None:
    wrappers = transformer_options.get("wrappers", {}).get(pe.WrappersMP.DIFFUSION_MODEL)
    if wrappers and WRAPPER_KEY in wrappers:
        wrappers[WRAPPER_KEY] = wrappers.pop(WRAPPER_KEY)


def outer_sample_wrapper(executor, *args, **kwargs):
    guider = executor.class_obj
    # CFGGuider.sample already cloned model_options for this run: changes here do not leak.
    options = guider.model_options.setdefault("transformer_options", {})
    holder: PatchScheduleHolder | None = options.get(HOLDER_KEY)
    if holder is None:
        return executor(*args, **kwargs)
    sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
    run = ScheduleRun(holder.config, holder.binding, sigmas, guider.model_patcher.get_model_object("model_sampling"))
    options[RUN_KEY] = run
    _make_innermost(options)
    start = time.perf_counter()
    try:
        return executor(*args, **kwargs)
    finally:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # once per run, so the logged time includes queued GPU work
        run.report.seconds = time.perf_counter() - start
        holder.last_report = run.report
        run.report.graph_replays = run.graphs.replays - run.graph_replays_before if run.graphs else 0
        note = f"; {run.report.graph_replays} coarse calls replayed as CUDA graphs" if run.graphs else ""
        log.info(run.report.summary() + note)
        run.release()
        options.pop(RUN_KEY, None)


def _first_chunk(x: torch.Tensor, options: dict, channels: int) -> torch.Tensor:
    """The latent of the first conditioning chunk (cond and uncond share one trajectory)."""
    chunks = max(len(options.get("cond_or_uncond") or [0]), 1)
    return x[: max(x.shape[0] // chunks, 1), :channels]


def apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                        **kwargs):
    run: ScheduleRun | None = (transformer_options.get(RUN_KEY)
                               if isinstance(transformer_options, dict) else None)
    if run is None or run.config.forced:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    run.sampler_input = (x, t)  # read by the diffusion-model call inside, where the step is decided
    try:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    finally:
        run.sampler_input = None


def diffusion_model_wrapper(executor, *args, **kwargs):
    bound = bind_call(executor, args, kwargs)
    options = bound.arguments.get("transformer_options")
    run: ScheduleRun | None = options.get(RUN_KEY) if isinstance(options, dict) else None
    if run is None:  # called outside a sampler (or by another node's own loop): stay out of the way
        return executor(*args, **kwargs)

    x = bound.arguments["x"]
    context = bound.arguments.get("context")
    text_tokens = context.shape[1] if context is not None and context.ndim == 3 else 0
    if run.config.never_coarse:  # tau = 0 / all-native schedule: no decision, no GPU sync
        run.account(x, text_tokens, 1)
        return executor(*args, **kwargs)

    # the sampler's own latent and sigma where apply_model handed them over, else this call's input
    source, sigma = run.sampler_input or (x, run.sigma_of(bound.arguments["timestep"]))
    sigma0 = float(sigma.flatten()[0])
    step = run.step_index(sigma0)
    latent = None if run.config.forced else _first_chunk(source, options, run.binding.latent_channels)
    adapter: AdapterHolder | None = options.get(ADAPTER_KEY)
    # with an adapter, the automatic schedule picks only the patch sizes it was trained for
    allowed = adapter.factors if adapter is not None else None
    factor = run.factor_for_step(step, latent, sigma0, allowed)

    if factor > 1:
        reason = spatial_blocker(bound)
        if reason is None and x.ndim != run.binding.latent_ndim:
            reason = f"{x.ndim}-d latent"
        if reason is not None:
            run.fallback(reason)
            factor = 1
    run.account(x, text_tokens, factor)
    if factor == 1:
        return executor(*args, **kwargs)

    if adapter is not None and not adapter.covers(factor):
        run.note(f"{factor}p steps ran training-free: adapter {adapter.name} covers "
                 + ", ".join(f"{k}p" for k in adapter.factors))
        adapter = None
    if adapter is not None:
        run.report.adapter_calls += 1

    graphs = None
    if adapter is not None and run.config.cuda_graphs:
        run.note("CUDA graphs are not used for steps with a patch adapter (yet)")
    model_class = type(executor.class_obj).__qualname__
    if (run.config.cuda_graphs and adapter is None and x.is_cuda and model_class not in GraphCache.uncapturable
            and graphable(bound.arguments)):
        if run.graphs is None:
            run.graphs = cache_for(executor.class_obj)
            run.graph_replays_before = run.graphs.replays
        graphs = run.graphs
    return run_coarse(executor, bound, factor, run, graphs, adapter)
