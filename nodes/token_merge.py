"""The "Token Merge" node: MODEL in, MODEL out (V3 schema, thin by design)."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..ideas.merge import apply_token_merge
from ..ideas.merge.config import MAX_RATIO, ORDERS, VIDEO_MODES, TokenMergeConfig


class TokenMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ElasticTokensTokenMerge",
            display_name="Token Merge",
            category="model_patches/elastic_tokens",
            description=(
                "Token merging with a global pattern for Flux and Wan 2.x (LGM-style; training-free, or learned "
                "on your model with Load Merge Pattern and order 'learned'): "
                "before the transformer blocks, groups of neighbouring image tokens (pairs, 2x2 squares, "
                "or for video the same place in 2 or 4 consecutive frames) become one token, their mean; "
                "after the blocks every token gets its group's prediction back, keeping its own noise. "
                "On small test models it loses to simply running fewer steps at the same cost (a learned "
                "pattern narrows the gap), so compare on your model. The pattern depends only on "
                "the image size, the ratio (and a learned one on the model), so every step and sample merge "
                "alike. Merged tokens count "
                "as many tokens as they hold in attention. Stacks with Dynamic Patch Schedule (coarse "
                "steps are not merged) and EasyCache; the log reports the tokens merged and the saving."),
            inputs=[
                io.Model.Input("model", tooltip="A Flux-family or Wan 2.x model."),
                io.Float.Input("ratio", default=0.5, min=0.0, max=MAX_RATIO, step=0.05,
                               display_mode=io.NumberDisplay.slider,
                               tooltip="Share of image tokens merged away on merged steps. 0 = off (identical "
                                       "to the plain model); 0.5 = every pair of neighbours one token (about "
                                       "half the transformer work); 0.75 = every 2x2 square one token. Higher "
                                       "is faster and loses fine detail: compare with fewer plain steps."),
                io.Combo.Input("order", options=list(ORDERS), default="spread",
                               tooltip="Which regions merge first below the full pattern: 'spread' spreads the "
                                       "merges evenly over the image (a checkerboard-like dither); "
                                       "'border_first' merges the border fully first and the centre last; "
                                       "'learned' uses the pattern of a Load Merge Pattern node (learned "
                                       "on this model: tokens whose outputs are alike merge first)."),
                io.Combo.Input("video_mode", options=list(VIDEO_MODES), default="within_frames",
                               tooltip="Video only (images always merge within the frame): 'within_frames' "
                                       "groups neighbours in each frame; 'across_frames' groups the same place "
                                       "in 2 or 4 consecutive latent frames (good for static regions); 'both' "
                                       "pairs frames first, then neighbours."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling percent where merging starts (as ComfyUI's start/end "
                                       "settings: 0 = the first step)."),
                io.Float.Input("end_percent", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling percent where merging ends; later steps run every token "
                                       "(they add the fine detail). Not above start_percent: nothing is merged."),
                io.Boolean.Input("proportional_attention", default=True,
                                 tooltip="A merged token counts as many tokens as it holds in attention "
                                         "(+log|S| on its keys' logits), as ToMe and LGM do. Off: plain "
                                         "attention over the merged tokens."),
            ],
            outputs=[io.Model.Output(tooltip="The model with token merging.")],
        )

    @classmethod
    def execute(cls, model, ratio, order, video_mode, start_percent, end_percent,
                proportional_attention=True) -> io.NodeOutput:
        config = TokenMergeConfig(ratio=ratio, order=order, video_mode=video_mode, start_percent=start_percent,
                                  end_percent=end_percent, proportional_attention=bool(proportional_attention))
        return io.NodeOutput(apply_token_merge(model, config))

