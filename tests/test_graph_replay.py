"""What decides whether a coarse call may be replayed as a CUDA graph, and how calls are keyed.

Replay itself needs a GPU: bench/bench_speed.py checks on the device that graph replay gives
the eager result on the same seed (``graph_vs_eager_rel`` in benchmarks/). Here: the rules.
"""

import torch
from comfy_runtime import load_pack

load_pack()

from elastic_tokens.runtime.graph_replay import _signature, _tensors, graphable  # noqa: E402


def test_only_tensors_none_and_scalars_are_graphable():
    cpu = {"x": torch.zeros(1), "timestep": torch.zeros(1), "y": None, "transformer_options": {"a": [1]}}
    assert not graphable(cpu)  # CPU tensors: nothing to capture
    assert not graphable({"x": None, "ref_latents": [torch.zeros(1)]})  # lists of tensors change per call
    assert not graphable({"control": {"input": []}})
    assert graphable({"x": None, "guidance": 3.5, "kwargs": {"attention_mask": None}, "transformer_options": {}})
    assert not graphable({"kwargs": {"extra": [1, 2]}})


def test_signature_keys_on_shapes_and_scalars_not_on_values_or_options():
    a = {"x": torch.zeros(2, 16, 8, 8), "timestep": torch.zeros(2), "steps": 3, "transformer_options": {"k": 1}}
    b = {"x": torch.ones(2, 16, 8, 8), "timestep": torch.ones(2), "steps": 3, "transformer_options": {"k": 2}}
    assert _signature(a) == _signature(b)
    assert _signature(a) != _signature({**a, "x": torch.zeros(1, 16, 8, 8)})
    assert _signature(a) != _signature({**a, "x": torch.zeros(2, 16, 8, 8, dtype=torch.float64)})
    assert _signature(a) != _signature({**a, "steps": 4})
    assert set(_tensors({**a, "kwargs": {"mask": torch.zeros(1)}})) == {"x", "timestep", "kwargs.mask"}


def test_graphs_are_kept_per_model_until_weights_move_or_the_model_is_unloaded(pack, tiny_flux):
    from elastic_tokens.runtime import graph_replay
    from elastic_tokens.ideas.patch import apply_patch_schedule
    from elastic_tokens.ideas.patch.config import PatchScheduleConfig

    model = torch.nn.Linear(4, 4)
    first = graph_replay.cache_for(model)
    assert graph_replay.cache_for(model) is first  # same weights: the next run reuses the graphs
    with torch.no_grad():
        model.weight.mul_(2)  # patched in place: replays read the new values, cache stays
    assert graph_replay.cache_for(model) is first
    model.weight = torch.nn.Parameter(torch.zeros(4, 4))  # re-created: captured addresses are stale
    second = graph_replay.cache_for(model)
    assert second is not first
    graph_replay.drop_cache(model)
    assert graph_replay.cache_for(model) is not second

    # ComfyUI detaches the patcher after every run (ON_DETACH): graphs stay while the weights
    # stay in place, and go as soon as the weights have moved (offloaded model)
    patched = apply_patch_schedule(tiny_flux, PatchScheduleConfig(cuda_graphs=True))
    dm = torch.nn.Linear(2, 2)
    patched.model.diffusion_model, real = dm, patched.model.diffusion_model
    try:
        cache = graph_replay.cache_for(dm)
        patched.detach()
        assert graph_replay._PERSISTENT.get(dm) is cache
        dm.weight = torch.nn.Parameter(dm.weight.detach().clone())
        patched.detach()
        assert graph_replay._PERSISTENT.get(dm) is None
    finally:
        patched.model.diffusion_model = real
