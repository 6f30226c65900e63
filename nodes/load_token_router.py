"""The "Load Token Router" node: MODEL in, MODEL out, with a trained token router attached.

Routers live in ``models/elastic_tokens/`` (``.safetensors`` only, beside patch adapters) and are
made by ``scripts/train_patch_adapter.py --mode router``. They change nothing on their own: the
Elastic Token Router with scorer ``learned`` ranks the tokens by them (place this node before it).
"""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..ideas.drop.router_file import RouterFileError, attach_router, load_router
from ..ideas.drop.router_file import FORMAT as ROUTER_FORMAT
from .load_patch_adapter import file_names, register_folder, selected_path


class LoadTokenRouter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_folder()
        return io.Schema(
            node_id="ElasticTokensLoadTokenRouter",
            display_name="Load Token Router",
            category="model_patches/elastic_tokens",
            description=(
                "Attach a token router trained for this model (scripts/train_patch_adapter.py --mode "
                "router): a tiny network that ranks the image tokens of each step by how much skipping "
                "them would cost. The Elastic Token Router uses it with scorer 'learned' (place this "
                "node before it). Files go in models/elastic_tokens/."),
            inputs=[
                io.Model.Input("model", tooltip="The Flux or Wan model the router was trained on."),
                io.Combo.Input("router_name", options=file_names(ROUTER_FORMAT),
                               tooltip="A .safetensors token router in models/elastic_tokens/."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the router attached (for scorer 'learned').")],
        )

    @classmethod
    def execute(cls, model, router_name) -> io.NodeOutput:
        path = selected_path(model, router_name, node="Load Token Router", input_name="router_name",
                             error=RouterFileError, noun="token router",
                             train="scripts/train_patch_adapter.py --mode router",
                             otherwise=" and use a training-free scorer")
        return io.NodeOutput(attach_router(model, load_router(path), router_name))
