"""The "Load Merge Pattern" node: MODEL in, MODEL out, with a learned merge pattern attached.

Patterns live in ``models/elastic_tokens/`` (``.safetensors`` only, the folder patch adapters use)
and are made by ``scripts/train_patch_adapter.py --mode pattern``. They change nothing on their own:
Token Merge uses one when its order is ``learned`` (place this node before or after it).
"""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..ideas.merge.learned_pattern import PatternError, attach_merge_pattern, load_pattern
from ..ideas.merge.learned_pattern import FORMAT as PATTERN_FORMAT
from .load_patch_adapter import file_names, register_folder, selected_path


class LoadMergePattern(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_folder()
        return io.Schema(
            node_id="ElasticTokensLoadMergePattern",
            display_name="Load Merge Pattern",
            category="model_patches/elastic_tokens",
            description=(
                "Attach a merge pattern learned on this model (scripts/train_patch_adapter.py --mode "
                "pattern): which neighbouring tokens Token Merge joins, chosen from the model's own "
                "outputs instead of a fixed layout. Token Merge uses it with order 'learned'. A pattern "
                "is made for one image (or video) size. Files go in models/elastic_tokens/."),
            inputs=[
                io.Model.Input("model", tooltip="The Flux or Wan model the pattern was learned on."),
                io.Combo.Input("pattern_name", options=file_names(PATTERN_FORMAT),
                               tooltip="A .safetensors merge pattern in models/elastic_tokens/."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the pattern attached (for Token Merge, "
                                             "order 'learned').")],
        )

    @classmethod
    def execute(cls, model, pattern_name) -> io.NodeOutput:
        path = selected_path(model, pattern_name, node="Load Merge Pattern", input_name="pattern_name",
                             error=PatternError, noun="merge pattern",
                             train="scripts/train_patch_adapter.py --mode pattern")
        return io.NodeOutput(attach_merge_pattern(model, load_pattern(path)))
