"""The pack's ComfyExtension: the list of nodes ComfyUI registers."""

from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io

from .dynamic_patch_schedule import DynamicPatchSchedule
from .elastic_token_router import ElasticTokenRouter
from .load_merge_pattern import LoadMergePattern
from .load_patch_adapter import LoadPatchAdapter
from .load_token_router import LoadTokenRouter
from .token_merge import TokenMerge


class ElasticTokensExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [DynamicPatchSchedule, LoadPatchAdapter, ElasticTokenRouter, TokenMerge, LoadMergePattern,
                LoadTokenRouter]
