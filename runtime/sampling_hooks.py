"""The runtime's one set of hooks into ComfyUI's sampling loop, shared by every idea.

A node adds its planner with :func:`add_planner` (on a clone of the MODEL). The first planner
also adds the wrappers, each once, with ``add_wrapper_with_key`` (chainable):

* OUTER_SAMPLE: makes a fresh :class:`~.run.SamplingRun` for the run, moves our DIFFUSION_MODEL
  wrapper to the innermost place (so caches such as EasyCache, applied in any order, see
  full-size inputs and outputs and can skip our calls too), logs the run's report.
* APPLY_MODEL: hands the sampler's own latent to the run, in full precision, before ComfyUI
  casts it to the model's dtype (a bf16 latent's rounding noise would swamp the trajectory's
  third difference and make every step look detailed); only when a planner reads it.
* DIFFUSION_MODEL: maps the call to its step, gets the step's plan (made once per step by the
  stacked planners), falls back to native where this call's inputs forbid the plan, counts its
  FLOPs and runs it (runtime/execute.py).

Nothing here replaces a model method or touches the input ModelPatcher.
"""

from __future__ import annotations

import logging
import time

import comfy.patcher_extension as pe
import torch

from ..families import FamilyBinding, binding_for
from ..families.call_args import bind_call
from .branch_split import call_by_branch
from .execute import admit, call_with_plan
from .graph_replay import drop_if_stale
from .report import STACK_KEY, RunReport
from .run import SamplingRun
from .token_plan import NATIVE, TokenPlan

WRAPPER_KEY = "elastic_tokens.runtime"
RUN_KEY = "elastic_tokens_run"

log = logging.getLogger("elastic_tokens")


class PlannerStack:
    """The planners stacked on a cloned model (in graph order) and the latest run's report.

    Immutable apart from ``last_report``: adding a planner makes a new stack for the new clone.
    """

    def __init__(self, planners: tuple, binding: FamilyBinding):
        self.planners = planners
        self.binding = binding
        self.last_report: RunReport | None = None

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options: planners are immutable
        copy = PlannerStack(self.planners, self.binding)
        copy.last_report = self.last_report
        return copy


def add_planner(model, planner):
    """A clone of ``model`` (a ModelPatcher) whose sampling runs also plan with ``planner``.

    Raises :class:`~elastic_tokens.families.UnsupportedModelError` for models other than Flux /
    Wan flow models. Planners stack: each sampling step gets one plan from all of them
    (runtime/token_plan.py says how they compose). The input model is not changed.
    """
    binding = binding_for(model)
    patched = model.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    stack: PlannerStack | None = options.get(STACK_KEY)
    options[STACK_KEY] = PlannerStack((stack.planners if stack else ()) + (planner,), binding)
    if stack is None:
        patched.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample_wrapper)
        patched.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, apply_model_wrapper)
        patched.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, diffusion_model_wrapper)
        patched.add_callback_with_key(pe.CallbacksMP.ON_DETACH, WRAPPER_KEY, _drop_graphs_on_unload)
    return patched


def planners_of(model) -> tuple:
    """The planners stacked on ``model`` (a ModelPatcher), in graph order."""
    stack = model.model_options.get("transformer_options", {}).get(STACK_KEY)
    return stack.planners if stack is not None else ()


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
    stack: PlannerStack | None = options.get(STACK_KEY)
    if stack is None:
        return executor(*args, **kwargs)
    sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
    run = SamplingRun(stack.planners, stack.binding, sigmas, guider.model_patcher.get_model_object("model_sampling"),
                      options)
    options[RUN_KEY] = run
    _make_innermost(options)
    start = time.perf_counter()
    try:
        return executor(*args, **kwargs)
    finally:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # once per run, so the logged time includes queued GPU work
        report = run.report
        report.seconds = time.perf_counter() - start
        report.graph_replays = run.graphs.replays - run.graph_replays_before if run.graphs else 0
        run.finish()
        stack.last_report = report
        log.info(report.summary())
        run.release()
        options.pop(RUN_KEY, None)


def _first_chunk(x: torch.Tensor, options: dict, channels: int) -> torch.Tensor:
    """The latent of the first conditioning chunk (cond and uncond share one trajectory)."""
    chunks = max(len(options.get("cond_or_uncond") or [0]), 1)
    return x[: max(x.shape[0] // chunks, 1), :channels]


def apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                        **kwargs):
    run: SamplingRun | None = (transformer_options.get(RUN_KEY)
                               if isinstance(transformer_options, dict) else None)
    if run is None or not run.needs_latent:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    run.sampler_input = (x, t)  # read by the diffusion-model call inside, where the step is planned
    try:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    finally:
        run.sampler_input = None


def diffusion_model_wrapper(executor, *args, **kwargs):
    bound = bind_call(executor, args, kwargs)
    options = bound.arguments.get("transformer_options")
    run: SamplingRun | None = options.get(RUN_KEY) if isinstance(options, dict) else None
    if run is None:  # called outside a sampler (or by another node's own loop): stay out of the way
        return executor(*args, **kwargs)

    x = bound.arguments["x"]
    context = bound.arguments.get("context")
    text_tokens = context.shape[1] if context is not None and context.ndim == 3 else 0
    if run.idle:  # tau = 0 / all-native schedule: no decision, no GPU sync
        run.account(None, x.shape, text_tokens, NATIVE)
        return executor(*args, **kwargs)

    # the sampler's own latent and sigma where apply_model handed them over, else this call's input
    source, sigma = run.sampler_input or (x, run.sigma_of(bound.arguments["timestep"]))
    sigma0 = float(sigma.max())  # per-token timesteps (Wan 2.2 TI2V with a mask): the noisy tokens
    step = run.step_index(sigma0)
    channels = run.binding.latent_channels
    plan = run.plan_for(step, sigma0, x.shape, options, lambda: _first_chunk(source, options, channels))

    def call(plan: TokenPlan, bound) -> torch.Tensor:
        plan = admit(plan, bound, run)
        run.account(step, bound.arguments["x"].shape, text_tokens, plan)
        return call_with_plan(executor, bound, plan, run)

    if plan.uncond is not None:  # the uncond branch runs its own tokens: one call per branch
        cond_plan = plan.replace(uncond=None)
        out = call_by_branch(bound, lambda b: call(cond_plan, b), lambda b: call(plan.uncond, b))
        if out is not None:
            return out
        run.fallback("branches not split")
        plan = cond_plan
    return call(plan, bound)

