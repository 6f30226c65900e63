"""Bad input as a user sends it (issue 15, item 6): each case goes through the public path a user
takes, the node's ``execute()`` or sampling through ComfyUI's KSampler, and checks the message.

1. the automatic schedule on a latent smaller than a coarse block (72x40 px FLUX, latent 9x5);
2. Load Patch Adapter with no adapter selected (empty folder, ``None`` / ``""`` from the API);
3. a ``max_patch`` value outside the list;
4. an adapter file whose tensors hold NaN / inf;
5. a forced schedule of absurd total length;
6. an empty start/end window (start >= end): no effect, no exception.
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch

import node_runs
import tiny_models

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run single-threaded

NODE_DEFAULTS = dict(tau=0.5, rho=0.4, warmup_steps=3, start_percent=0.0, end_percent=0.9, max_patch="4p",
                     forced_schedule="", coarse_embed="area", coarse_deembed="bilinear", cuda_graphs=False)


def schedule_node(model, **changes):
    """The Dynamic Patch Schedule node as the UI runs it: defaults, plus ``changes``."""
    from elastic_tokens.nodes.dynamic_patch_schedule import DynamicPatchSchedule

    return DynamicPatchSchedule.execute(model, **{**NODE_DEFAULTS, **changes}).result[0]


ksample = functools.partial(node_runs.ksample, steps=8, seed=7)


def report(model):
    from elastic_tokens import last_run_report

    return last_run_report(model)


@pytest.fixture
def adapter_folder(tmp_path, monkeypatch):
    """An empty models/elastic_tokens folder, registered as ComfyUI's only one for adapters."""
    import folder_paths

    from elastic_tokens.nodes.load_patch_adapter import FOLDER

    folder = tmp_path / "models" / FOLDER
    folder.mkdir(parents=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, FOLDER, ([str(folder)], {".safetensors"}))
    return folder


# ----------------------------------------------------------------------------- 1

@pytest.mark.parametrize("family", ["flux", "wan"])
def test_automatic_schedule_on_a_latent_smaller_than_a_coarse_block_samples(pack, tiny_flux, tiny_wan, family):
    # 72x40 px: a 9x5 latent. 4p's criterion block is 8x8 latent cells and does not fit; 2p's (4x4) does.
    if family == "flux":
        model, cfg = tiny_flux, 1.0
        pos, neg = tiny_models.flux_conditioning()
        latent = tiny_models.flux_latent(72, 40)
    else:
        model, cfg = tiny_wan, 5.0
        pos, neg = tiny_models.wan_conditioning()
        latent = tiny_models.wan_latent(72, 40, 9)
    assert latent["samples"].shape[-2:] == (5, 9)
    patched = schedule_node(model, tau=1.0)  # tau 1: every scored step goes as coarse as it can
    out = ksample(patched, pos, neg, latent, cfg=cfg)
    rep = report(patched)
    assert out.shape == latent["samples"].shape and torch.isfinite(out).all()
    assert 4 not in rep.step_factors
    assert rep.step_factors[:3] == [1, 1, 1] and 2 in rep.step_factors[3:]  # 2p, whose block fits, is chosen
    assert all(set(scores) == {2} for scores in rep.step_scores[3:])  # 4p was never scored
    assert "4p not chosen: a 8x8 block does not fit the 5x9 latent" in rep.summary()
    # the node's defaults (tau 0.5) also sample
    assert torch.isfinite(ksample(schedule_node(model), pos, neg, latent, cfg=cfg)).all()


def test_latent_smaller_than_every_coarse_block_stays_native(pack, tiny_flux):
    pos, neg = tiny_models.flux_conditioning()
    latent = tiny_models.flux_latent(24, 24)  # 3x3 latent: not even 2p's 4x4 block fits
    plain = ksample(tiny_flux, pos, neg, latent)
    patched = schedule_node(tiny_flux, tau=1.0)
    assert torch.equal(ksample(patched, pos, neg, latent), plain)
    assert report(patched).step_factors == [1] * 8
    assert "2p, 4p not chosen: a 4x4 block does not fit the 3x3 latent" in report(patched).summary()


# ----------------------------------------------------------------------------- 2

@pytest.mark.parametrize("adapter_name", [None, "", "  "])
def test_load_patch_adapter_with_no_adapter_selected_says_so(pack, tiny_flux, adapter_folder, adapter_name):
    from elastic_tokens.ideas.patch.adapter_file import AdapterError
    from elastic_tokens.nodes.load_patch_adapter import LoadPatchAdapter

    inputs = {i.id: i for i in LoadPatchAdapter.define_schema().inputs}
    assert inputs["adapter_name"].options == []  # the empty folder: the UI has nothing to pick
    with pytest.raises(AdapterError, match="no adapter selected") as err:
        LoadPatchAdapter.execute(tiny_flux, adapter_name, 1.0)
    assert str(adapter_folder) in str(err.value)  # where adapters go
    assert "train_patch_adapter.py" in str(err.value)


def test_load_patch_adapter_with_no_adapter_on_an_unsupported_model_names_the_model_problem(pack, adapter_folder):
    import comfy.model_patcher

    from elastic_tokens.families import UnsupportedModelError
    from elastic_tokens.nodes.load_patch_adapter import LoadPatchAdapter

    other = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))
    for name in (None, ""):
        with pytest.raises(UnsupportedModelError, match="supports Flux-family .* and Wan"):
            LoadPatchAdapter.execute(other, name, 1.0)


# ----------------------------------------------------------------------------- 3

@pytest.mark.parametrize("max_patch", ["8p", "4", 4, None])
def test_max_patch_outside_the_list_names_the_allowed_values(pack, tiny_flux, max_patch):
    with pytest.raises(ValueError, match=r"max_patch must be one of '4p', '2p', got"):
        schedule_node(tiny_flux, max_patch=max_patch)


# ----------------------------------------------------------------------------- 4

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["coarse.2.size_embedding", "lora"])
def test_adapter_with_non_finite_tensors_is_refused_naming_file_and_tensor(pack, tiny_flux, adapter_folder,
                                                                           bad, where):
    from elastic_tokens.families import binding_for
    from elastic_tokens.ideas.patch.adapter_file import AdapterError, AdapterSpec, PatchAdapter, save_adapter
    from elastic_tokens.nodes.load_patch_adapter import LoadPatchAdapter

    binding = binding_for(tiny_flux)
    spec = AdapterSpec.for_model(tiny_flux, binding, (2,), rank=4)
    dm = tiny_flux.model.diffusion_model
    module = binding.feed_forward[0]
    w = dm.get_submodule(module).weight
    adapter = PatchAdapter(spec, {2: {module: (torch.randn(4, w.shape[1]), torch.zeros(w.shape[0], 4))}})
    with torch.no_grad():
        if where == "lora":
            adapter.lora[2][module][1][3, 1] = bad
            tensor = f"lora.2.{module}.lora_B.weight"
        else:
            adapter.coarse["2"].size_embedding[5] = bad
            tensor = where
    save_adapter(adapter, adapter_folder / "broken.safetensors")
    with pytest.raises(AdapterError, match=r"broken\.safetensors: tensor '" + tensor.replace(".", r"\.")
                       + r"' has 1 NaN/inf value"):
        LoadPatchAdapter.execute(tiny_flux, "broken.safetensors", 1.0)


# ----------------------------------------------------------------------------- 5

def test_forced_schedule_total_length_is_capped(pack, tiny_flux):
    with pytest.raises(ValueError, match=r"forced_schedule: more than 10000 steps in all .* at most 10000 steps"):
        schedule_node(tiny_flux, forced_schedule="1x10000, 2x1")
    with pytest.raises(ValueError, match="more than 10000 steps"):
        schedule_node(tiny_flux, forced_schedule=",".join(["2x10000"] * 5000))  # 50 M steps
    with pytest.raises(ValueError, match=r"repeat count in '2x10001' must be 1\.\.10000"):  # per part, as before
        schedule_node(tiny_flux, forced_schedule="2x10001")
    from elastic_tokens.runtime.sampling_hooks import planners_of

    (planner,) = planners_of(schedule_node(tiny_flux, forced_schedule="2x4, 1x9996"))  # exactly the cap
    assert len(planner.config.forced) == 10000


# ----------------------------------------------------------------------------- 6

@pytest.mark.parametrize("start,end", [(0.8, 0.2), (0.5, 0.5), (1.0, 0.0)])
def test_empty_window_has_no_effect_and_says_so_once(pack, tiny_flux, caplog, start, end):
    from elastic_tokens.runtime.sampling_hooks import planners_of

    pos, neg = tiny_models.flux_conditioning()
    latent = tiny_models.flux_latent(64, 64)
    plain = ksample(tiny_flux, pos, neg, latent)
    with caplog.at_level(logging.INFO, logger="elastic_tokens"):
        patched = schedule_node(tiny_flux, tau=1.0, start_percent=start, end_percent=end)
        out = ksample(patched, pos, neg, latent)
    (planner,) = planners_of(patched)
    assert planner.config.never_coarse  # the runtime treats the planner as idle
    assert torch.equal(out, plain)
    assert report(patched).step_factors == [1] * 8
    said = [r.getMessage() for r in caplog.records if "window is empty" in r.getMessage()]
    assert len(said) == 1, said
    assert f"start_percent {start:g} >= end_percent {end:g}" in said[0] and "no effect" in said[0]


def test_window_range_checks_remain(pack, tiny_flux):
    for name, value in (("start_percent", -0.1), ("end_percent", 1.5), ("start_percent", float("nan"))):
        with pytest.raises(ValueError, match=f"{name} must be in \\[0, 1\\]"):
            schedule_node(tiny_flux, **{name: value})


def test_forced_schedule_ignores_the_window_even_when_empty(pack, tiny_flux):
    # the window never applied to a forced schedule; an empty one does not change that
    pos, neg = tiny_models.flux_conditioning()
    patched = schedule_node(tiny_flux, forced_schedule="2x3", start_percent=0.9, end_percent=0.1)
    ksample(patched, pos, neg, tiny_models.flux_latent(64, 64))
    assert report(patched).step_factors == [2, 2, 2, 1, 1, 1, 1, 1]
