"""The "Load Patch Adapter" node: MODEL in, MODEL out, with a trained patch adapter attached.

Adapters live in ``models/elastic_tokens/`` (``.safetensors`` only) and are made by
``scripts/train_patch_adapter.py``. They change nothing on their own: the Dynamic Patch Schedule
uses them on its coarse steps (place this node before or after it).
"""

from __future__ import annotations

import os

from comfy_api.v0_0_2 import io

from ..families import binding_for
from ..ideas.patch.adapter_attach import attach_patch_adapter
from ..ideas.patch.adapter_file import FORMAT as ADAPTER_FORMAT
from ..ideas.patch.adapter_file import AdapterError, load_adapter

FOLDER = "elastic_tokens"


def register_folder() -> None:
    """``models/elastic_tokens`` (plus any extra_model_paths.yaml entry of that name), .safetensors only."""
    import folder_paths

    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)
    paths, _ = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, {".safetensors"})


def file_names(fmt: str) -> list[str]:
    """The loader's dropdown: files in ``models/elastic_tokens`` that are not the pack's files of
    another kind (adapters, routers and merge patterns share the folder)."""
    import folder_paths

    from ..ideas.learned_file import listed_for

    return listed_for(fmt, folder_paths.get_filename_list(FOLDER), lambda n: folder_paths.get_full_path(FOLDER, n))


def selected_path(model, name, *, node: str, input_name: str, error: type[Exception], noun: str,
                  train: str, otherwise: str = "") -> str:
    """The path of the file a loader node picked from ``models/elastic_tokens``; an unsupported
    model, or no file picked, gets its own message (where to put a ``noun`` made by ``train``)."""
    import folder_paths

    binding_for(model)  # an unsupported model gets its own message first
    if not isinstance(name, str) or not name.strip():
        folders = folder_paths.get_folder_paths(FOLDER) if FOLDER in folder_paths.folder_names_and_paths else []
        where = " or ".join(folders) or f"models/{FOLDER}/"
        raise error(f"{node}: no {noun.split()[-1]} selected ({input_name} is {name!r}). Put a .safetensors "
                    f"{noun} made by {train} in {where}, refresh the node list and pick it; or bypass this "
                    f"node{otherwise}.")
    return folder_paths.get_full_path_or_raise(FOLDER, name)


class LoadPatchAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_folder()
        return io.Schema(
            node_id="ElasticTokensLoadPatchAdapter",
            display_name="Load Patch Adapter",
            category="model_patches/elastic_tokens",
            description=(
                "Attach a patch adapter trained for this model (scripts/train_patch_adapter.py): "
                "coarse-patch embed/de-embed layers and LoRA that the Dynamic Patch Schedule uses on "
                "its coarse steps only; native steps stay the untouched model. Files go in "
                "models/elastic_tokens/."),
            inputs=[
                io.Model.Input("model", tooltip="The Flux or Wan model the adapter was trained on "
                                                 "(user LoRAs may be applied before or after)."),
                io.Combo.Input("adapter_name", options=file_names(ADAPTER_FORMAT),
                               tooltip="A .safetensors patch adapter in models/elastic_tokens/."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               display_mode=io.NumberDisplay.slider,
                               tooltip="Scales everything the adapter adds. 0 = training-free coarse "
                                       "steps, 1 = as trained."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the adapter attached (for coarse steps).")],
        )

    @classmethod
    def execute(cls, model, adapter_name, strength) -> io.NodeOutput:
        path = selected_path(model, adapter_name, node="Load Patch Adapter", input_name="adapter_name",
                             error=AdapterError, noun="patch adapter", train="scripts/train_patch_adapter.py")
        return io.NodeOutput(attach_patch_adapter(model, load_adapter(path), strength, adapter_name))
