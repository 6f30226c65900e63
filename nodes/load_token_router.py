"""The "Load Token Router" node: MODEL in, MODEL out, with a trained token router attached.

Routers live in ``models/elastic_tokens/`` (``.safetensors`` only, beside patch adapters) and are
made by ``scripts/train_patch_adapter.py --mode router``. They change nothing on their own: the
Elastic Token Router with scorer ``learned`` ranks the tokens by them (place this node before it).
"""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..families import binding_for
from ..ideas.drop.router_file import RouterFileError, attach_router, load_router
from ..ideas.drop.router_file import FORMAT as ROUTER_FORMAT
from .load_patch_adapter import FOLDER, file_names, register_folder


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
        import folder_paths

        binding_for(model)  # an unsupported model gets its own message first
        if not isinstance(router_name, str) or not router_name.strip():
            folders = folder_paths.get_folder_paths(FOLDER) if FOLDER in folder_paths.folder_names_and_paths else []
            where = " or ".join(folders) or f"models/{FOLDER}/"
            raise RouterFileError(
                f"Load Token Router: no router selected (router_name is {router_name!r}). Put a .safetensors "
                f"token router made by scripts/train_patch_adapter.py --mode router in {where}, refresh "
                f"the node list and pick it; or bypass this node and use a training-free scorer.")
        path = folder_paths.get_full_path_or_raise(FOLDER, router_name)
        return io.NodeOutput(attach_router(model, load_router(path), router_name))
