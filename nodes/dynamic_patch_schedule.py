"""The "Dynamic Patch Schedule" node: MODEL in, MODEL out (V3 schema, thin by design)."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..ideas.patch import apply_patch_schedule
from ..ideas.patch.config import PatchScheduleConfig

_FACTOR_CHOICES = {"4p": 4, "2p": 2}


class DynamicPatchSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        slider = io.NumberDisplay.slider
        return io.Schema(
            node_id="ElasticTokensDynamicPatchSchedule",
            display_name="Dynamic Patch Schedule",
            category="model_patches/elastic_tokens",
            description=(
                "DDiT-style dynamic patching for Flux and Wan 2.x: steps whose latent changes are "
                "smooth run with 2x or 4x larger patches (4x or 16x fewer tokens); steps that refine "
                "detail run at the native patch size. Training-free. Place between the model loader "
                "and the sampler; the log reports the schedule and the FLOPs saved. Stacks with the "
                "pack's other nodes (one token plan per step); two patch schedules in one graph run "
                "each step at the larger patch either asks for."),
            inputs=[
                io.Model.Input("model", tooltip="A Flux-family or Wan 2.x model."),
                io.Float.Input("tau", default=0.5, min=0.0, max=1.0, step=0.01, display_mode=slider,
                               tooltip="Threshold. A step goes coarse when the share of the trajectory's "
                                       "change that varies inside a coarse patch is below tau. "
                                       "0 = never coarse (identical to the plain model); higher = "
                                       "more coarse steps, faster, less detail. Without a patch "
                                       "adapter, coarse steps cost quality quickly: compare with "
                                       "fewer plain steps at the same speed."),
                io.Float.Input("rho", default=0.4, min=0.0, max=1.0, step=0.05, display_mode=slider,
                               tooltip="Percentile over patches used for the decision. Lower = judge "
                                       "by the calmer regions (more coarse steps); higher = let the "
                                       "busiest regions decide (safer)."),
                io.Int.Input("warmup_steps", default=3, min=3, max=200,
                             tooltip="Steps always run at the native patch size at the start. At least "
                                     "3: the criterion needs four latents of the trajectory."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the sampling steps after which coarse steps may start. "
                                       "If it is not below end_percent the window is empty: no step "
                                       "goes coarse (the node has no effect; a forced schedule still "
                                       "runs as written)."),
                io.Float.Input("end_percent", default=0.9, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the sampling steps after which every step is native "
                                       "(the last steps add the fine detail). If it is not above "
                                       "start_percent the window is empty: no step goes coarse (the "
                                       "node has no effect; a forced schedule still runs as written)."),
                io.Combo.Input("max_patch", options=list(_FACTOR_CHOICES), default="4p",
                               tooltip="Largest patch allowed: 2p (4x fewer tokens) or 4p (16x fewer). "
                                       "With a patch adapter attached, only the sizes it was trained "
                                       "for are picked."),
                io.String.Input("forced_schedule", default="",
                                tooltip="Optional fixed schedule that overrides tau/rho, the warm-up and "
                                        "the start/end window: patch size per "
                                        "step, e.g. '1x6, 2x22' (6 native steps, then 22 at 2p) or "
                                        "'4x4,2x10,1x14'. Steps past its end run native."),
                io.Combo.Input("coarse_embed", options=["area", "pinv-bilinear"], default="area",
                               tooltip="How a coarse patch is embedded: averaging (area) or the pseudo-"
                                       "inverse of bilinear resizing (FlexiViT PI-resize)."),
                io.Combo.Input("coarse_deembed", options=["bilinear", "nearest"], default="bilinear",
                               tooltip="How a coarse prediction is brought back to full size."),
                io.Boolean.Input("cuda_graphs", default=False,
                                 tooltip="Replay coarse steps as CUDA graphs: removes launch overhead at "
                                         "small token counts (FLUX: ~1.4x more on coarse steps). Needs "
                                         "the model fully on the GPU; turn off if another pack changes "
                                         "the model inside a step."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the dynamic patch schedule.")],
        )

    @classmethod
    def execute(cls, model, tau, rho, warmup_steps, start_percent, end_percent, max_patch,
                forced_schedule, coarse_embed, coarse_deembed, cuda_graphs) -> io.NodeOutput:
        if not isinstance(max_patch, str) or max_patch not in _FACTOR_CHOICES:
            raise ValueError(f"max_patch must be one of {', '.join(map(repr, _FACTOR_CHOICES))}, "
                             f"got {max_patch!r}")
        config = PatchScheduleConfig(
            tau=tau, rho=rho, warmup_steps=warmup_steps, start_percent=start_percent,
            end_percent=end_percent, max_patch=_FACTOR_CHOICES[max_patch],
            forced_schedule=forced_schedule, coarse_embed=coarse_embed, coarse_deembed=coarse_deembed,
            cuda_graphs=cuda_graphs)
        return io.NodeOutput(apply_patch_schedule(model, config))

