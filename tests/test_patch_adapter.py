"""Patch adapters: the file format, attaching them to a MODEL, the Load Patch Adapter node, and
what they do inside the Dynamic Patch Schedule's sampling loop.

Real ComfyUI on CPU, the tiny random-weight Flux / Wan of tests/support/tiny_models.py and the
real sampler (``comfy.sample.sample``); adapters here are built by hand (zero-initialised like a
fresh one, or filled with small random values). Training is tested in test_adapter_training.py.

The key property: an untrained adapter reproduces the training-free coarse step bit for bit, a
non-zero one changes the coarse steps only (native steps run the untouched model), and it leaves
nothing behind on the model (forward hooks, options of the MODEL passed in).
"""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

import tiny_models

ADAPTER_KEY = "elastic_tokens_patch_adapter"
SEED = 7


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run single-threaded


# ----------------------------------------------------------------------------- helpers

def make_adapter(model, factors=(2,), *, rank=4, nonzero=False, lora_b=None, coarse=None, seed=0, **spec_changes):
    """A PatchAdapter for ``model`` as the trainer builds it (zero corrections, LoRA A random and
    B zero as peft initialises them). ``nonzero``: small random corrections and LoRA B.
    ``lora_b`` / ``coarse`` override ``nonzero`` for the LoRA B and the coarse layers separately
    (``coarse`` may name the layers to fill, e.g. ``("deembed", "residual")``)."""
    from elastic_tokens.families import binding_for
    from elastic_tokens.ideas.patch.adapter_file import AdapterSpec, PatchAdapter

    binding = binding_for(model)
    spec = dataclasses.replace(AdapterSpec.for_model(model, binding, factors, rank, training={"test": True}),
                               **spec_changes)
    gen = torch.Generator().manual_seed(seed)
    lora_b = nonzero if lora_b is None else lora_b
    coarse = nonzero if coarse is None else coarse
    dm = model.model.diffusion_model
    lora = {}
    for k in spec.factors:
        layers = {}
        for name in binding.feed_forward:
            w = dm.get_submodule(name).weight
            a = torch.randn(rank, w.shape[1], generator=gen) / w.shape[1] ** 0.5
            b = torch.randn(w.shape[0], rank, generator=gen) * 0.05 if lora_b else torch.zeros(w.shape[0], rank)
            layers[name] = (a, b)
        lora[k] = layers
    adapter = PatchAdapter(spec, lora)
    if coarse:
        names = ("embed", "size_embedding", "deembed", "residual") if coarse is True else coarse
        with torch.no_grad():
            for name, p in adapter.coarse.named_parameters():
                if name.split(".")[1] in names:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return adapter


def round_trip(adapter, tmp_path, name="adapter.safetensors"):
    from elastic_tokens.ideas.patch.adapter_file import load_adapter, save_adapter

    return load_adapter(save_adapter(adapter, tmp_path / name))


def inputs(family):
    if family == "flux":
        pos, neg = tiny_models.flux_conditioning()
        return pos, neg, tiny_models.flux_latent(64, 64)["samples"], 1.0
    pos, neg = tiny_models.wan_conditioning()
    return pos, neg, tiny_models.wan_latent(64, 64, 9)["samples"], 5.0


def with_schedule(model, **settings):
    from elastic_tokens.ideas.patch import apply_patch_schedule
    from elastic_tokens.ideas.patch.config import PatchScheduleConfig

    return apply_patch_schedule(model, PatchScheduleConfig(**settings))


def attach(model, adapter, strength=1.0, name="test-adapter"):
    from elastic_tokens.ideas.patch.adapter_attach import attach_patch_adapter

    return attach_patch_adapter(model, adapter, strength, name)


def sample(model, family, steps=8):
    """(final latent, per-step clean estimates) from ComfyUI's sampler, euler / simple."""
    import comfy.sample

    pos, neg, latent, cfg = inputs(family)
    denoised = []
    noise = comfy.sample.prepare_noise(latent, SEED)
    out = comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", pos, neg, latent, seed=SEED,
                              disable_pbar=True, callback=lambda i, x0, x, total: denoised.append(x0.clone()))
    assert len(denoised) == steps
    return out, denoised


def report(model):
    from elastic_tokens import last_run_report

    return last_run_report(model)


def assert_no_hooks_left(model):
    dm = model.model.diffusion_model
    left = [name for name, m in dm.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not left, f"forward hooks left on {left[:5]}"


@pytest.fixture
def models(tiny_flux, tiny_wan):
    return {"flux": tiny_flux, "wan": tiny_wan}


# ----------------------------------------------------------------------------- the file format

def test_save_load_round_trip_keeps_spec_and_every_tensor(pack, tiny_flux, tmp_path):
    from safetensors import safe_open

    from elastic_tokens.ideas.patch.adapter_file import FORMAT, state_dict_for_file

    adapter = make_adapter(tiny_flux, factors=(2, 4), nonzero=True)
    loaded = round_trip(adapter, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]  # no .tmp left behind
    assert loaded.spec == adapter.spec
    assert loaded.spec.fingerprint == adapter.spec.fingerprint and loaded.spec.training == {"test": True}
    assert loaded.spec.factors == (2, 4) and loaded.spec.lora_targets == adapter.spec.lora_targets
    before, after = state_dict_for_file(adapter), state_dict_for_file(loaded)
    assert before.keys() == after.keys()
    # every coarse layer of both factors and A and B of every LoRA target
    assert len(before) == 2 * 4 + 2 * 2 * len(adapter.spec.lora_targets)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    with safe_open(str(tmp_path / "adapter.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == FORMAT
        assert "lora.2.double_blocks.0.img_mlp.0.lora_A.weight" in f.keys()


def test_unusable_files_raise_adapter_error_with_a_readable_reason(pack, tiny_flux, tmp_path):
    from safetensors.torch import save_file

    from elastic_tokens.ideas.patch.adapter_file import AdapterError, FORMAT_VERSION, load_adapter, save_adapter

    good = save_adapter(make_adapter(tiny_flux, nonzero=True), tmp_path / "good.safetensors")

    class Payload:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(tmp_path / "UNPICKLED"), "w"))

    cases = {}
    for suffix in (".ckpt", ".pt"):
        path = tmp_path / f"adapter{suffix}"
        path.write_bytes(pickle.dumps(Payload()))
        cases[path] = r"\.safetensors files only"
    cases[tmp_path / "missing.safetensors"] = "not found"
    plain = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(2)}, str(plain))
    cases[plain] = "not an Elastic Tokens patch adapter"
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(good.read_bytes()[:200])
    cases[damaged] = "not a readable safetensors file"
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    cases[garbage] = "not a readable safetensors file"
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), metadata={**meta, "version": str(FORMAT_VERSION + 1)})
    cases[newer] = "format version"
    wrong_size = tmp_path / "wrong_size.safetensors"
    save_file(tensors, str(wrong_size), metadata={**meta, "hidden_size": "32"})
    cases[wrong_size] = "do not match its metadata"
    half_lora = tmp_path / "half_lora.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.endswith("lora_B.weight")}, str(half_lora), metadata=meta)
    cases[half_lora] = "only one of lora_A / lora_B"

    for path, reason in cases.items():
        with pytest.raises(AdapterError, match=reason) as info:
            load_adapter(path)
        assert type(info.value) is AdapterError  # not a safetensors / torch / pickle error type
        assert str(info.value).startswith(path.name) or str(path) in str(info.value), str(info.value)
    assert not (tmp_path / "UNPICKLED").exists()  # no pickle was ever loaded
    assert load_adapter(good).spec.family == "flux"


# ----------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("family", ["flux", "wan"])
def test_untrained_adapter_is_bit_identical_to_the_training_free_schedule(pack, models, family, tmp_path):
    model = models[family]
    options_before = set(model.model_options.get("transformer_options", {}))
    adapter = round_trip(make_adapter(model), tmp_path)  # LoRA A random, everything else zero
    free = with_schedule(model, forced_schedule="1x3,2x5")
    free_out, free_steps = sample(free, family)
    # either order of the two nodes: Load Patch Adapter before or after the schedule
    with_adapter = (with_schedule(attach(model, adapter), forced_schedule="1x3,2x5") if family == "flux"
                    else attach(with_schedule(model, forced_schedule="1x3,2x5"), adapter))
    out, steps = sample(with_adapter, family)
    rep = report(with_adapter)
    assert rep.step_factors == [1, 1, 1, 2, 2, 2, 2, 2]
    assert rep.adapter_calls == 5 and report(free).adapter_calls == 0  # cond+uncond share one call
    assert "5 coarse calls with the patch adapter" in rep.summary()
    assert torch.equal(out, free_out)
    assert all(torch.equal(a, b) for a, b in zip(steps, free_steps))
    assert_no_hooks_left(model)
    assert set(model.model_options.get("transformer_options", {})) == options_before
    assert ADAPTER_KEY not in model.model_options.get("transformer_options", {})


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_nonzero_adapter_changes_the_coarse_steps_only(pack, models, family, tmp_path):
    model = models[family]
    adapter = round_trip(make_adapter(model, nonzero=True), tmp_path)
    free_out, free_steps = sample(with_schedule(model, forced_schedule="1x3,2x5"), family)
    patched = with_schedule(attach(model, adapter), forced_schedule="1x3,2x5")
    out, steps = sample(patched, family)
    assert report(patched).adapter_calls == 5
    assert torch.isfinite(out).all()
    for i in range(3):  # native steps: the untouched model
        assert torch.equal(steps[i], free_steps[i]), i
    for i in range(3, 8):
        assert not torch.allclose(steps[i], free_steps[i], atol=1e-5), i
    assert not torch.allclose(out, free_out, atol=1e-5)
    assert_no_hooks_left(model)
    assert ADAPTER_KEY not in model.model_options.get("transformer_options", {})

    # each part of the adapter acts on its own: the LoRA (forward hooks), the token corrections
    # (first block hook) and the output corrections (last block hook + clean estimate)
    for part in (dict(lora_b=True, coarse=False), dict(lora_b=False, coarse=("embed", "size_embedding")),
                 dict(lora_b=False, coarse=("deembed",)), dict(lora_b=False, coarse=("residual",))):
        only = with_schedule(attach(model, make_adapter(model, **part)), forced_schedule="1x3,2x5")
        only_out, _ = sample(only, family)
        assert not torch.allclose(only_out, free_out, atol=1e-5), part
        assert not torch.allclose(only_out, out, atol=1e-5), part
    assert_no_hooks_left(model)

    # an all-native schedule never touches the adapter: the plain model's output exactly
    plain_out, _ = sample(model, family)
    native = with_schedule(attach(model, adapter), forced_schedule="1x8")
    native_out, _ = sample(native, family)
    assert report(native).step_factors == [1] * 8 and report(native).adapter_calls == 0
    assert torch.equal(native_out, plain_out)
    # and without the schedule node an attached adapter changes nothing either
    assert torch.equal(sample(attach(model, adapter), family)[0], plain_out)


def test_adapter_without_the_factor_runs_those_steps_training_free_and_says_so(pack, tiny_flux, tmp_path):
    adapter = round_trip(make_adapter(tiny_flux, factors=(2,), nonzero=True), tmp_path)
    schedule = "4x3,2x3,1x2"
    free_out, free_steps = sample(with_schedule(tiny_flux, forced_schedule=schedule), "flux")
    patched = with_schedule(attach(tiny_flux, adapter, name="only2p.safetensors"), forced_schedule=schedule)
    out, steps = sample(patched, "flux")
    rep = report(patched)
    assert rep.step_factors == [4, 4, 4, 2, 2, 2, 1, 1]
    assert rep.adapter_calls == 3
    for i in range(3):  # 4p steps: training-free, as without the adapter
        assert torch.equal(steps[i], free_steps[i]), i
    assert not torch.allclose(steps[3], free_steps[3], atol=1e-5)
    note = "4p steps ran training-free: adapter only2p.safetensors covers 2p"
    assert rep.notes == [note]
    assert note in rep.summary()
    assert_no_hooks_left(tiny_flux)


def test_dynamic_schedule_uses_the_adapter_on_its_coarse_steps(pack, tiny_flux, tmp_path):
    adapter = round_trip(make_adapter(tiny_flux, factors=(2, 4), nonzero=True), tmp_path)
    patched = with_schedule(attach(tiny_flux, adapter), tau=1.0, rho=0.4, warmup_steps=3, end_percent=0.75)
    out, _ = sample(patched, "flux", steps=12)
    rep = report(patched)
    coarse = [k for k in rep.step_factors if k > 1]
    assert rep.step_factors[:3] == [1, 1, 1] and rep.step_factors[9:] == [1, 1, 1]
    assert len(coarse) == 6 and rep.adapter_calls == 6  # tau = 1: every scored step goes coarse
    assert not rep.notes and torch.isfinite(out).all()
    assert_no_hooks_left(tiny_flux)


def test_dynamic_schedule_picks_only_the_sizes_the_adapter_covers(pack, tiny_flux, tmp_path):
    """tau = 1 sends every scored step to the largest patch (4p) without an adapter; with a 2p-only
    adapter those steps run at 2p with it, never training-free at 4p."""
    settings = dict(tau=1.0, rho=0.4, warmup_steps=3, end_percent=0.75)
    free = with_schedule(tiny_flux, **settings)
    sample(free, "flux", steps=12)
    assert report(free).step_factors[3:9] == [4] * 6
    adapter = round_trip(make_adapter(tiny_flux, factors=(2,), nonzero=True), tmp_path)
    patched = with_schedule(attach(tiny_flux, adapter), **settings)
    out, _ = sample(patched, "flux", steps=12)
    rep = report(patched)
    assert rep.step_factors[3:9] == [2] * 6 and rep.adapter_calls == 6
    assert all(set(scores) == {2} for scores in rep.step_scores[3:9])
    assert not rep.notes and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- attaching

def test_adapters_for_another_model_are_refused_with_the_reason(pack, tiny_flux, tiny_wan, tmp_path):
    from elastic_tokens.families import binding_for
    from elastic_tokens.ideas.patch.adapter_file import AdapterError, fingerprint

    flux_adapter = round_trip(make_adapter(tiny_flux), tmp_path)
    with pytest.raises(AdapterError, match="trained for a FLUX model; this MODEL is WAN"):
        attach(tiny_wan, flux_adapter)
    with pytest.raises(AdapterError, match="hidden size 32 vs. model 64"):
        attach(tiny_flux, make_adapter(tiny_flux, hidden_size=32))

    # fingerprint of a differently seeded model of the same architecture
    binding = binding_for(tiny_flux)
    other = tiny_models.random_weights(tiny_models._flux_shapes(), seed=11)
    other_fp = fingerprint({n: other[n] for n in binding.fingerprint_names})
    with pytest.raises(AdapterError, match="trained on other base weights than this MODEL .*similarity"):
        attach(tiny_flux, round_trip(make_adapter(tiny_flux, fingerprint=other_fp), tmp_path, "other.safetensors"))
    # a stored fingerprint with one tensor's values changed (sign flipped)
    stored = make_adapter(tiny_flux).spec.fingerprint
    tampered = {**stored, "img_in.weight": {**stored["img_in.weight"],
                                            "values": [-v for v in stored["img_in.weight"]["values"]]}}
    with pytest.raises(AdapterError, match=r"img_in\.weight differs"):
        attach(tiny_flux, make_adapter(tiny_flux, fingerprint=tampered))
    # ... but the same weights in bf16 (a cast, as when the user loads another precision) match
    dm = tiny_flux.model.diffusion_model
    bf16_fp = fingerprint({n: dm.get_parameter(n).to(torch.bfloat16) for n in binding.fingerprint_names})
    attach(tiny_flux, make_adapter(tiny_flux, fingerprint=bf16_fp))

    # LoRA on layers this model does not have
    odd = make_adapter(tiny_flux)
    odd.lora[2] = {"double_blocks.7.img_mlp.0": odd.lora[2]["double_blocks.0.img_mlp.0"]}
    with pytest.raises(AdapterError, match="not Linear layers of this model"):
        attach(tiny_flux, odd)
    with pytest.raises(ValueError, match="strength must be in"):
        attach(tiny_flux, flux_adapter, strength=-1.0)
    assert ADAPTER_KEY not in tiny_flux.model_options.get("transformer_options", {})


def test_user_lora_weight_patches_compose_with_the_adapter(pack, tiny_flux, tmp_path):
    adapter = round_trip(make_adapter(tiny_flux, nonzero=True), tmp_path)
    # a user LoRA on a feed-forward weight that is also one of the adapter's LoRA targets and
    # one of the fingerprinted weights
    key = "diffusion_model.single_blocks.1.linear2.weight"
    weight = tiny_flux.model.diffusion_model.get_parameter("single_blocks.1.linear2.weight")
    original = weight.detach().clone()
    user = tiny_flux.clone()
    user.add_patches({key: (torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)) * 0.5,)}, 1.0)
    schedule = "1x3,2x5"
    adapter_only, _ = sample(with_schedule(attach(tiny_flux, adapter), forced_schedule=schedule), "flux")
    user_only, user_steps = sample(with_schedule(user, forced_schedule=schedule), "flux")
    both_model = with_schedule(attach(user, adapter), forced_schedule=schedule)
    both, both_steps = sample(both_model, "flux")
    assert report(both_model).adapter_calls == 5
    assert torch.isfinite(both).all()
    assert not torch.allclose(both, adapter_only, atol=1e-4)   # the user LoRA still applies
    assert not torch.allclose(both, user_only, atol=1e-5)      # and so does the adapter
    for i in range(3):  # native steps: the user's LoRA model, without the adapter
        assert torch.equal(both_steps[i], user_steps[i]), i
    # ComfyUI may keep the LoRA merged into the weights after sampling; the fingerprint check reads
    # the base weights it backed up, so attaching again (a re-queued workflow) still works
    attach(user, adapter)
    assert_no_hooks_left(tiny_flux)
    sample(tiny_flux, "flux", steps=1)  # the plain model again: base weights restored
    assert torch.equal(weight.detach(), original)


# ----------------------------------------------------------------------------- the node

def test_load_patch_adapter_node(pack, tiny_flux, tmp_path, monkeypatch):
    import folder_paths

    from elastic_tokens.ideas.patch.adapter_file import save_adapter
    from elastic_tokens.ideas.patch.adapter_attach import AdapterHolder
    from elastic_tokens.nodes.load_patch_adapter import FOLDER, LoadPatchAdapter

    folder = tmp_path / "models" / FOLDER
    save_adapter(make_adapter(tiny_flux, nonzero=True), folder / "tiny_flux_2p.safetensors")
    (folder / "old.ckpt").write_bytes(b"not listed")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, FOLDER, ([str(folder)], {".safetensors"}))

    schema = LoadPatchAdapter.define_schema()
    assert schema.node_id == "ElasticTokensLoadPatchAdapter"
    inputs = {i.id: i for i in schema.inputs}
    assert list(inputs) == ["model", "adapter_name", "strength"]
    assert "tiny_flux_2p.safetensors" in inputs["adapter_name"].options
    assert "old.ckpt" not in inputs["adapter_name"].options
    assert all(i.tooltip for i in schema.inputs)

    out = LoadPatchAdapter.execute(tiny_flux, "tiny_flux_2p.safetensors", 1.0).result[0]
    holder = out.model_options["transformer_options"][ADAPTER_KEY]
    assert isinstance(holder, AdapterHolder) and holder.strength == 1.0
    assert holder.name == "tiny_flux_2p.safetensors" and holder.factors == (2,)
    assert ADAPTER_KEY not in tiny_flux.model_options.get("transformer_options", {})
    with pytest.raises(FileNotFoundError, match="'missing.safetensors' not found"):
        LoadPatchAdapter.execute(tiny_flux, "missing.safetensors", 1.0)

    # strength 0 is the training-free coarse step, exactly; strength 1 is not
    free, _ = sample(with_schedule(tiny_flux, forced_schedule="1x3,2x5"), "flux")
    zero = LoadPatchAdapter.execute(tiny_flux, "tiny_flux_2p.safetensors", 0.0).result[0]
    assert torch.equal(sample(with_schedule(zero, forced_schedule="1x3,2x5"), "flux")[0], free)
    full, _ = sample(with_schedule(out, forced_schedule="1x3,2x5"), "flux")
    assert not torch.allclose(full, free, atol=1e-5)
    assert_no_hooks_left(tiny_flux)
