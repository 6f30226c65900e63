"""The "Elastic Token Router" node: MODEL in, MODEL out (V3 schema, thin by design)."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..ideas.drop import apply_router
from ..ideas.drop.config import FILLS, SCORERS, RouterConfig
from ..ideas.drop.planner import missing_router_message
from ..ideas.drop.router_file import RouterFileError, attached_router


class ElasticTokenRouter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        slider = io.NumberDisplay.slider
        return io.Schema(
            node_id="ElasticTokensTokenRouter",
            display_name="Elastic Token Router",
            category="model_patches/elastic_tokens",
            description=(
                "Token dropping for Flux and Wan 2.x (DC-DiT / RAS, training-free): each step scores "
                "the image tokens and runs only the most important share (the budget) through the "
                "transformer; the others get their output back from the cache or from the nearest "
                "computed token. Text tokens always run. Place between the model loader and the "
                "sampler; stacks with Dynamic Patch Schedule (one token plan per step) and EasyCache. "
                "The log says how many image tokens were skipped."),
            inputs=[
                io.Model.Input("model", tooltip="A Flux-family or Wan 2.x model."),
                io.Float.Input("budget", default=0.5, min=0.1, max=1.0, step=0.05, display_mode=slider,
                               tooltip="Share of the image tokens computed on a routed step. 1.0 = every "
                                       "token (identical to the plain model); 0.5 = half (routed on every step: FLUX 1024² "
                                       "~1.6x faster with attend_skipped, ~1.7x without; Wan 1.3B 480p ~1.9x / "
                                       "~2.7x); lower = faster, less detail. The same "
                                       "scores serve every budget: a lower budget keeps a subset."),
                io.Combo.Input("scorer", options=list(SCORERS), default="context",
                               tooltip="How tokens are ranked. context (default, the best training-free "
                                       "scorer on every proxy): how badly the token is predicted from its "
                                       "neighbours on the current clean-image estimate (DC-DiT; detail and "
                                       "edges first). ras: how much the token's latent changed in the last "
                                       "step (RAS). change: how much the token's update "
                                       "itself changed (where the trajectory still turns). learned: a "
                                       "trained router (put a Load Token Router node before this one). "
                                       "A starvation "
                                       "term makes sure no region is skipped for long."),
                io.Combo.Input("fill", options=list(FILLS), default="cache",
                               tooltip="What a skipped token outputs. cache: its own output from the "
                                       "last step that computed it (kept per CFG branch; RAS). nearest: "
                                       "the output of the nearest computed token of this step (DC-DiT's "
                                       "de-chunk); needs no memory."),
                io.Float.Input("start_percent", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress after which routing starts (ComfyUI's "
                                       "percent, as EasyCache). Earlier steps lay out the image and run "
                                       "every token. If it is not below end_percent, no step is routed "
                                       "(the node has no effect)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress after which every token runs again (1.0 = "
                                       "route to the end)."),
                io.Int.Input("refresh_every", default=5, min=0, max=1000,
                             tooltip="Every k-th step of the window computes every token and renews the "
                                     "cache (RAS's dense steps). 0 = only the first step of the window; "
                                     "1 = every step dense (no saving)."),
                io.Boolean.Input("attend_skipped", default=True,
                                 tooltip="Computed tokens also attend to the skipped tokens' keys and values "
                                         "from their last computed step (RAS). Closer to the full step; "
                                         "costs memory (FLUX 1024²: ~3 GB per CFG branch, Wan 1.3B 480p "
                                         "81 frames: ~6 GB) and part of the speed-up, most on long videos, where "
                                         "attention is most of the work."),
                io.Float.Input("uncond_budget", default=1.0, min=0.1, max=1.0, step=0.05, display_mode=slider,
                               optional=True,
                               tooltip="Share of the image tokens the negative-prompt (uncond) branch of CFG "
                                       "computes on a routed step, where lower than budget (DC-DiT's "
                                       "Lite-CFG: the uncond prediction only steers, so it can afford "
                                       "fewer tokens; it keeps a subset of the cond branch's). 1.0 = the "
                                       "same as budget. Has no effect at CFG 1 (no uncond branch)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the token router.")],
        )

    @classmethod
    def execute(cls, model, budget, scorer, fill, start_percent, end_percent, refresh_every,
                attend_skipped=True, uncond_budget=1.0) -> io.NodeOutput:
        config = RouterConfig(budget=budget, scorer=scorer, fill=fill, start_percent=start_percent,
                              end_percent=end_percent, refresh_every=refresh_every, attend_skipped=attend_skipped,
                              uncond_budget=uncond_budget)
        if scorer == "learned" and not config.never_routes and attached_router(model) is None:
            raise RouterFileError(missing_router_message())
        return io.NodeOutput(apply_router(model, config))
