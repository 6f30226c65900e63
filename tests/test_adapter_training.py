"""Patch-adapter training (training/distill.py through scripts/train_patch_adapter.py) on CPU.

Short self-distillation runs on the tests' tiny Flux and Wan (the ``tiny-flux`` / ``tiny-wan``
providers of bench/bench_quality.py): the written adapter loads and attaches, is closer to the
native teacher than the training-free coarse step on inputs it never saw, gives at sampling time
exactly the velocity the trainer's student optimised, resumes exactly from a checkpoint without
regenerating its pool, and the torchrun (DDP, gloo) path completes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_models

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_patch_adapter.py"
# tiny-flux: 64x64 px (8x8 latent: 16 native tokens, 4 at 2p), 8 euler steps, cfg 1
FLUX_ARGS = ["--model", "tiny-flux", "--size", "64", "--pool", "8", "--gen-batch", "8", "--batch", "4",
             "--rank", "4", "--warmup", "1", "--lr", "3e-3", "--log-every", "10", "--seed", "0"]
STEPS = 80


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run single-threaded


@pytest.fixture(scope="module")
def script(pack):
    """The training command's module (scripts/train_patch_adapter.py runs its ``main``)."""
    from elastic_tokens.training import cli

    return cli


def run(script, capsys, *argv) -> tuple[dict, str]:
    """``train_patch_adapter.main(argv)`` in this process: (summary, printed log)."""
    summary = script.main([str(a) for a in argv])
    return summary, capsys.readouterr().out


@pytest.fixture(scope="module")
def flux_run(script, tmp_path_factory):
    """One STEPS-step tiny-flux run with a checkpoint folder (the reference of the resume test)."""
    out_dir = tmp_path_factory.mktemp("flux_run")
    out = out_dir / "tiny_flux_2p.safetensors"
    summary = script.main(FLUX_ARGS + ["--steps", str(STEPS), "--out", str(out), "--ckpt", str(out_dir / "ckpt")])
    return out, summary


def adapter_tensors(path):
    from elastic_tokens.ideas.patch.adapter_file import load_adapter, state_dict_for_file

    return state_dict_for_file(load_adapter(path))


# ----------------------------------------------------------------------------- evaluation

def _held_out_inputs(model, seeds=(1000, 1001)):
    """Clean latents the model samples natively on seeds outside the training pool (0..7), the
    provider's conditioning, and the sigmas that training covers (8 steps, skip 3)."""
    import comfy.sample
    import comfy.samplers

    pos, neg = tiny_models.flux_conditioning(batch=1, seed=0)  # the tiny-flux provider's prompt
    empty = tiny_models.flux_latent(64, 64)["samples"]
    x0 = []
    for seed in seeds:
        out = comfy.sample.sample(model, comfy.sample.prepare_noise(empty, seed), 8, 1.0, "euler", "simple",
                                  pos, neg, empty, seed=seed, disable_pbar=True)
        x0.append(model.model.process_latent_in(out.float()))
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", 8).float()[3:-1]
    return torch.cat(x0), pos[0], sigmas


def eval_batch(model):
    """Fixed inputs: held-out clean latents noised (fixed noise) to every trained sigma, and their
    conditioning as the model receives it."""
    x0, (context, extra), sigmas = _held_out_inputs(model)
    n = x0.shape[0] * sigmas.numel()
    x0 = x0.repeat_interleave(sigmas.numel(), 0)
    sigma = sigmas.repeat(n // sigmas.numel())
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(123))
    s = sigma.view(-1, 1, 1, 1)
    cond = dict(context=context.expand(n, -1, -1), y=extra["pooled_output"].expand(n, -1),
                guidance=torch.full((n,), float(extra["guidance"])))
    return (1 - s) * x0 + s * noise, sigma, cond


def sampling_velocities(model, adapter, x, sigma, cond):
    """(native, training-free 2p, adapter 2p) velocities through the sampling-time code: the
    schedule's default resize modes, AdapterHolder's layers and its LoRA as forward hooks."""
    from elastic_tokens.families import binding_for
    from elastic_tokens.runtime.coarse import coarse_velocity
    from elastic_tokens.ideas.patch.adapter_attach import AdapterHolder
    from elastic_tokens.ideas.patch.config import PatchScheduleConfig

    dm = model.model.diffusion_model
    binding = binding_for(model)
    t_per_sigma = float(model.get_model_object("model_sampling").timestep(torch.tensor(1.0)))
    modes = dict(coarse_embed=PatchScheduleConfig().coarse_embed, coarse_deembed=PatchScheduleConfig().coarse_deembed)

    def call(xs, ts, opts):
        return dm(xs, ts, transformer_options=opts, **cond)

    holder = AdapterHolder(adapter, 1.0, "trained")
    with torch.no_grad():
        native = call(x, sigma * t_per_sigma, {})
        free = coarse_velocity(call, x, sigma, torch.float32, 2, binding, t_per_sigma, {}, **modes)
        trained = coarse_velocity(call, x, sigma, torch.float32, 2, binding, t_per_sigma, {}, **modes,
                                  part=holder.part(2, x.device),
                                  lora=holder.lora_context(dm, 2, x.device, x.dtype))
    assert not any(m._forward_hooks for m in dm.modules())
    return native, free, trained


def trainer_student_velocity(adapter, x, sigma, cond):
    """The trainer's own student (peft LoRA in a fresh copy of the tiny Flux, the autograd-safe
    forward) holding ``adapter``'s exported tensors: what training optimised."""
    from elastic_tokens.training import distill as training
    from elastic_tokens.families import binding_for
    from elastic_tokens.families.autograd_forward import training_forward

    model = tiny_models.load_tiny_flux()  # peft changes the modules: never the session's model
    dm = model.model.diffusion_model
    binding = binding_for(model)
    spec = adapter.spec
    params = training.inject_lora(dm, spec.lora_targets, spec.factors, spec.rank, spec.alpha)
    with torch.no_grad():
        for name, (a, b) in adapter.lora[2].items():
            layer = dm.get_submodule(name)
            layer.lora_A["k2"].weight.copy_(a)
            layer.lora_B["k2"].weight.copy_(b)
    t_per_sigma = float(model.get_model_object("model_sampling").timestep(torch.tensor(1.0)))
    student = training.Student(dm, adapter, binding, training_forward(dm), training.lora_layers(dm), params,
                               training.TrainConfig(factors=spec.factors, rank=spec.rank), t_per_sigma)
    with torch.no_grad():
        return student(x, sigma, cond, 2)


# ----------------------------------------------------------------------------- tests

def test_trained_flux_adapter_loads_attaches_and_beats_training_free(pack, flux_run, tiny_flux):
    from elastic_tokens.families import binding_for
    from elastic_tokens.ideas.patch.adapter_file import base_fingerprint, fingerprint_problems, load_adapter
    from elastic_tokens.ideas.patch.adapter_attach import ADAPTER_KEY, attach_patch_adapter

    out, summary = flux_run
    adapter = load_adapter(out)
    spec = adapter.spec
    binding = binding_for(tiny_flux)
    assert (spec.family, spec.factors, spec.rank, spec.alpha) == ("flux", (2,), 4, 4.0)
    assert (spec.native_patch, spec.latent_channels, spec.hidden_size) == (2, 16, 64)
    assert spec.lora_targets == binding.feed_forward
    assert set(spec.fingerprint) == set(binding.fingerprint_names)
    assert not fingerprint_problems(spec.fingerprint, base_fingerprint(tiny_flux, binding))
    assert spec.training["steps_done"] == STEPS and spec.training["world_size"] == 1
    # LoRA of every feed-forward layer, trained (peft initialises B to zero)
    assert set(adapter.lora) == {2} and set(adapter.lora[2]) == set(binding.feed_forward)
    assert all(b.abs().max() > 0 for _, b in adapter.lora[2].values())
    assert all(p.abs().max() > 0 for p in adapter.coarse.parameters())

    written = json.loads(out.with_suffix(".json").read_text())
    assert written["steps"] == STEPS and written["world_size"] == 1 and written["family"] == "flux"
    assert summary["final_loss"] < summary["first_loss"]

    attached = attach_patch_adapter(tiny_flux, adapter, 1.0, out.name)
    assert attached.model_options["transformer_options"][ADAPTER_KEY].adapter is adapter

    x, sigma, cond = eval_batch(tiny_flux)
    native, free, trained = sampling_velocities(tiny_flux, adapter, x, sigma, cond)
    free_error, trained_error = float(((free - native) ** 2).mean()), float(((trained - native) ** 2).mean())
    assert trained_error < 0.6 * free_error, (free_error, trained_error)  # 0.50-0.52 (seeds 0-2)
    # what runs at sampling time is what the trainer optimised (same resize modes, LoRA scale, ...)
    torch.testing.assert_close(trainer_student_velocity(adapter, x, sigma, cond), trained, rtol=1e-4, atol=1e-4)


def test_resume_continues_exactly_without_regenerating_the_pool(pack, script, flux_run, tmp_path, capsys):
    reference, _ = flux_run
    out = tmp_path / "resumed.safetensors"
    ckpt = tmp_path / "ckpt"
    half = STEPS // 2
    first, log = run(script, capsys, *FLUX_ARGS, "--steps", half, "--out", out, "--ckpt", ckpt)
    assert "generating a pool of 8 samples" in log and first["steps"] == half
    pool_file = ckpt / "pool.rank0.safetensors"
    pool_stat = pool_file.stat()
    assert (ckpt / "state.pt").is_file()

    second, log = run(script, capsys, *FLUX_ARGS, "--steps", STEPS, "--out", out, "--ckpt", ckpt, "--resume")
    assert "generating a pool" not in log and f"resumed from {ckpt} at step {half}" in log
    assert pool_file.stat().st_mtime_ns == pool_stat.st_mtime_ns  # read, not rewritten
    assert second["steps"] == STEPS and second["steps_this_run"] == STEPS - half

    expected, got = adapter_tensors(reference), adapter_tensors(out)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)

    # resuming a finished run trains no further and writes the same adapter
    third, log = run(script, capsys, *FLUX_ARGS, "--steps", STEPS, "--out", out, "--ckpt", ckpt, "--resume")
    assert third["steps_this_run"] == 0 and "generating a pool" not in log
    assert all(torch.equal(a, b) for a, b in zip(adapter_tensors(out).values(), got.values()))


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # one peft adapter per factor, by design
def test_tiny_wan_trains_both_factors(pack, script, tiny_wan, tmp_path, capsys):
    from elastic_tokens.ideas.patch.adapter_file import load_adapter
    from elastic_tokens.ideas.patch.adapter_attach import attach_patch_adapter
    from elastic_tokens.ideas.patch import apply_patch_schedule
    from elastic_tokens.ideas.patch.config import PatchScheduleConfig

    out = tmp_path / "tiny_wan.safetensors"
    summary, log = run(script, capsys, "--model", "tiny-wan", "--factors", "2,4", "--pool", "2", "--gen-batch", "2",
                       "--batch", "2", "--rank", "4", "--steps", "6", "--warmup", "1", "--log-every", "3",
                       "--lr-final", "0.1", "--ckpt", tmp_path / "ckpt", "--out", out)
    assert summary["family"] == "wan" and summary["factors"] == [2, 4] and summary["steps"] == 6
    # cosine decay: the last update (step 5 of 6) ran at 0.1 + 0.9 * (1 + cos(5 pi / 6)) / 2 of each lr
    lrs = [g["lr"] for g in torch.load(tmp_path / "ckpt" / "state.pt", weights_only=True)["optim"]["param_groups"]]
    factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 6))
    assert lrs == pytest.approx([1e-3 * factor, 2e-4 * factor])
    adapter = load_adapter(out)
    assert adapter.spec.family == "wan" and adapter.spec.factors == (2, 4)
    assert set(adapter.lora) == {2, 4}
    assert all(len(adapter.lora[k]) == 4 for k in (2, 4))  # ffn.0 and ffn.2 of both blocks
    # cfg 2 > 1: cond and uncond of every pool sample were recorded and trained on
    assert "generated 2/2 pool samples" in log
    patched = apply_patch_schedule(attach_patch_adapter(tiny_wan, adapter, 1.0, out.name),
                                   PatchScheduleConfig(forced_schedule="4x2,2x2"))
    import comfy.sample

    pos, neg = tiny_models.wan_conditioning()
    latent = tiny_models.wan_latent(32, 32, 5)["samples"]
    result = comfy.sample.sample(patched, comfy.sample.prepare_noise(latent, 0), 6, 2.0, "euler", "simple", pos, neg,
                                 latent, seed=0, disable_pbar=True)
    from elastic_tokens import last_run_report

    report = last_run_report(patched)
    assert torch.isfinite(result).all() and report.adapter_calls == 4 and not report.notes


def test_torchrun_two_processes_on_cpu(pack, tmp_path):
    out = tmp_path / "ddp.safetensors"
    env = dict(os.environ, ELASTIC_TOKENS_TINY_TEXT_ENCODERS="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           *FLUX_ARGS, "--size", "32", "--steps", "4", "--out", str(out), "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4 and summary["device"] == "cpu"
    assert "on 2 process(es)" in proc.stdout
    from elastic_tokens.ideas.patch.adapter_file import load_adapter

    adapter = load_adapter(out)
    assert adapter.spec.training["world_size"] == 2 and adapter.spec.factors == (2,)


def test_torchrun_resume_restores_every_processs_batches(pack, tmp_path):
    """Two processes, 2 steps, then resumed to 4, give the adapter of an uninterrupted 4-step run:
    each process gets its own random batch stream back (not rank 0's on every rank)."""
    env = dict(os.environ, ELASTIC_TOKENS_TINY_TEXT_ENCODERS="1", OMP_NUM_THREADS="1")

    def torchrun(steps, out, ckpt, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
               *FLUX_ARGS, "--size", "32", "--steps", str(steps), "--out", str(out), "--ckpt", str(ckpt),
               "--device", "cpu", *extra]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    torchrun(4, tmp_path / "whole.safetensors", tmp_path / "ck_whole")
    torchrun(2, tmp_path / "resumed.safetensors", tmp_path / "ck")
    assert (tmp_path / "ck" / "rng.rank0.pt").is_file() and (tmp_path / "ck" / "rng.rank1.pt").is_file()
    log = torchrun(4, tmp_path / "resumed.safetensors", tmp_path / "ck", "--resume")
    assert "at step 2" in log and "lacks some processes' random states" not in log
    expected, got = adapter_tensors(tmp_path / "whole.safetensors"), adapter_tensors(tmp_path / "resumed.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)


def test_clear_errors_for_bad_settings(pack, script, tmp_path):
    out = tmp_path / "never.safetensors"
    with pytest.raises(ValueError, match="factors must be 2 and/or 4"):
        script.main(FLUX_ARGS + ["--factors", "3", "--out", str(out)])
    with pytest.raises(ValueError, match="rank must be >= 1"):
        script.main(FLUX_ARGS + ["--rank", "0", "--out", str(out)])
    with pytest.raises(ValueError, match="lr_final is a fraction"):
        script.main(FLUX_ARGS + ["--lr-final", "2", "--out", str(out)])
    with pytest.raises(ValueError, match="skip_steps=8 leaves no steps of the 8-step schedule"):
        script.main(FLUX_ARGS + ["--skip-steps", "8", "--out", str(out)])
    assert not out.exists()


def test_schedule_trains_only_its_coarse_steps_each_at_its_own_factor(pack, tiny_flux):
    import types

    import comfy.samplers
    from elastic_tokens.training import distill as tr

    cfg = tr.TrainConfig(factors=(2, 4), schedule=(4, 4, 2, 2, 2), batch=16)  # steps 5..7 native
    provider = types.SimpleNamespace(steps=8, scheduler="simple")
    sigmas = comfy.samplers.calculate_sigmas(tiny_flux.get_model_object("model_sampling"), "simple", 8).float()
    assert torch.equal(tr._sampling_sigmas(provider, tiny_flux)[0], sigmas)
    by_factor = tr._train_sigmas(sigmas, cfg)
    assert torch.equal(by_factor[4], sigmas[:2]) and torch.equal(by_factor[2], sigmas[2:5])
    conds = [[{"context": torch.zeros(1, 4, 8)}] for _ in range(3)]
    gen, seen = torch.Generator().manual_seed(0), []
    for _ in range(40):
        x_t, sigma, _, factor = tr._batch(torch.zeros(3, 16, 8, 8), conds, tr._batches_by_shape(conds), by_factor,
                                          cfg, gen, "cpu", torch.float32)
        assert x_t.shape == (16, 16, 8, 8) and set(sigma.tolist()) <= set(by_factor[factor].tolist())
        seen.append(factor)
    assert set(seen) == {2, 4} and seen.count(2) > seen.count(4)  # 3 steps at 2p, 2 at 4p
    with pytest.raises(ValueError, match="the schedule has 4p steps but factors are"):
        tr.TrainConfig(factors=(2,), schedule=(4, 2, 1))
    with pytest.raises(ValueError, match="the schedule never runs at 4p"):
        tr.TrainConfig(factors=(2, 4), schedule=(2, 2, 1))
    with pytest.raises(ValueError, match="no coarse step"):
        tr.TrainConfig(factors=(2,), schedule=(1, 1))
    with pytest.raises(ValueError, match="the schedule has 9 steps, the model samples 8"):
        tr._train_sigmas(sigmas, tr.TrainConfig(factors=(2,), schedule=(2,) * 9))


def test_step_weights_draw_the_named_steps_more_often(pack, script, tiny_flux):
    import comfy.samplers
    from elastic_tokens.training import distill as tr

    assert script.parse_step_weights("2-4:4, 7:0.5") == {2: 4.0, 3: 4.0, 4: 4.0, 7: 0.5}
    with pytest.raises(ValueError, match="is not STEP:WEIGHT"):
        script.parse_step_weights("2-4")
    with pytest.raises(ValueError, match="weights > 0"):
        tr.TrainConfig(step_weights={2: 0.0})
    sigmas = comfy.samplers.calculate_sigmas(tiny_flux.get_model_object("model_sampling"), "simple", 8).float()
    with pytest.raises(ValueError, match=r"names step\(s\) \[6\] that training does not cover"):
        tr._train_weights(sigmas, tr.TrainConfig(schedule=(2,) * 5, step_weights={6: 2.0}))
    assert tr._train_weights(sigmas, tr.TrainConfig(schedule=(2,) * 5)) == {}  # uniform, as before

    cfg = tr.TrainConfig(factors=(2,), schedule=(2,) * 5, step_weights={1: 9.0}, batch=500)
    by_factor, weights = tr._train_sigmas(sigmas, cfg), tr._train_weights(sigmas, cfg)
    assert weights[2].tolist() == [1.0, 9.0, 1.0, 1.0, 1.0]
    conds = [[{"context": torch.zeros(1, 4, 8)}]]
    _, sigma, _, _ = tr._batch(torch.zeros(1, 16, 8, 8), conds, tr._batches_by_shape(conds), by_factor, cfg,
                               torch.Generator().manual_seed(0), "cpu", torch.float32, weights)
    share = float((sigma == sigmas[1]).float().mean())
    assert 0.6 < share < 0.8  # 9 / 13 = 0.69
    # default mode (steps from skip_steps on): indices are sampling steps, not offsets
    weights = tr._train_weights(sigmas, tr.TrainConfig(factors=(2,), skip_steps=3, step_weights={3: 2.0}))
    assert weights[2].tolist() == [2.0, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # one peft adapter per factor, by design
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_rollouts_follow_the_samplers_own_trajectory(pack, family):
    """Rollout states (training/rollouts.py) are the states ComfyUI's KSampler visits with the node's
    forced schedule: same noise, an untrained adapter (= training-free coarse steps), and for Wan
    CFG 2 with cond and uncond. So training on them trains on the sampler's real trajectory."""
    import argparse

    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    import bench_quality
    import comfy.sample
    import comfy.samplers
    from elastic_tokens.training import distill as tr
    from elastic_tokens.families import binding_for
    from elastic_tokens.training.rollouts import cfg_entries, rollout
    from elastic_tokens.ideas.patch import apply_patch_schedule
    from elastic_tokens.ideas.patch.config import PatchScheduleConfig

    provider = (bench_quality.TinyFluxProvider(argparse.Namespace(size=64)) if family == "flux"
                else bench_quality.TinyWanProvider(argparse.Namespace(size=32)))
    model = provider.load()
    schedule = (1, 2, 2, 4, 2, 1)
    seeds = [0, 1]
    empty = provider.empty_latent(len(seeds))
    noise = torch.randn(empty.shape, generator=torch.Generator().manual_seed(5))
    pos, neg = provider.conditioning(seeds)
    seen = {}
    comfy.sample.sample(apply_patch_schedule(model, PatchScheduleConfig(forced_schedule="1,2x2,4,2,1")), noise,
                        provider.steps, provider.cfg, provider.sampler, provider.scheduler, pos, neg, empty, seed=0,
                        disable_pbar=True, callback=lambda i, x0, x, n: seen.setdefault(i, x.clone()))

    _, conds = tr.generate_pool(provider, model, seeds, len(seeds), lambda *a: None)
    cfg = tr.TrainConfig(factors=(2, 4), rank=4, schedule=schedule)
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, provider.scheduler, provider.steps).float()
    student, _ = tr._build_student(model, binding_for(model), cfg, "cpu", float(sampling.timestep(torch.tensor(1.0))))
    entries = cfg_entries(conds, provider.cfg)
    assert entries == (2 if family == "wan" else 1)
    states = rollout(student, tr._stack, conds, [0, 1], schedule, sigmas, provider.cfg, entries, empty.shape[1:],
                     torch.Generator().manual_seed(5), "cpu", torch.float32)
    assert [k for k, _, _ in states] == [2, 2, 4, 2]
    for (k, x, sig), step in zip(states, (1, 2, 3, 4)):
        assert torch.allclose(sig, torch.full((2,), float(sigmas[step])))
        torch.testing.assert_close(x, seen[step], rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # one peft adapter per factor, by design
def test_replay_buffer_rollout_settings_and_a_run_with_rollouts(pack, script, tmp_path, capsys):
    from elastic_tokens.training import distill as tr
    from elastic_tokens.training.rollouts import ReplayBuffer, cfg_entries

    buf = ReplayBuffer(keep=5)
    for start in (0, 3):
        buf.add(2, torch.arange(start, start + 3).float().view(3, 1), torch.full((3,), 0.5), torch.arange(3))
    assert len(buf) == 5 and buf.x[2].flatten().tolist() == [1, 2, 3, 4, 5]  # the most recent 5
    x, sigma, sample = buf.draw(2, 7, torch.Generator().manual_seed(0))
    assert x.shape == (7, 1) and set(x.flatten().tolist()) <= {1, 2, 3, 4, 5} and sample.shape == (7,)
    uneven = [[{"context": torch.zeros(1, n, 8)}] for n in (4, 5)]
    with pytest.raises(ValueError, match="one shape across the pool"):
        cfg_entries(uneven, 1.0)
    with pytest.raises(ValueError, match="give one with --schedule"):
        tr.TrainConfig(rollout_every=5)
    with pytest.raises(ValueError, match="rollout_share is a fraction"):
        tr.TrainConfig(schedule=(2, 1), rollout_every=5, rollout_share=1.5)

    out = tmp_path / "rollouts.safetensors"
    summary, log = run(script, capsys, *FLUX_ARGS, "--steps", "6", "--factors", "2,4", "--schedule", "1,2x3,4x2",
                       "--rollout-every", "3", "--rollout-batch", "2", "--rollout-share", "1", "--out", out)
    assert "rollouts: every 3 steps, 2 samples through the schedule" in log and summary["steps"] == 6
    from elastic_tokens.ideas.patch.adapter_file import load_adapter

    assert load_adapter(out).spec.training["rollout_every"] == 3


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("family", ["flux", "wan"])
def test_validation_measures_what_the_sampler_does(pack, family):
    """training/validation.py samples as ComfyUI's KSampler with the node does: its references are
    the native samples of the same noise, and its error for an untrained adapter (training-free
    coarse steps) is the MSE between the node's samples and the native ones (Wan: CFG 2)."""
    import argparse

    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    import bench_quality
    import comfy.sample
    import comfy.samplers
    from elastic_tokens.training import distill as tr
    from elastic_tokens.families import binding_for
    from elastic_tokens.training.rollouts import cfg_entries
    from elastic_tokens.training.validation import TrajectoryValidator
    from elastic_tokens.ideas.patch import apply_patch_schedule
    from elastic_tokens.ideas.patch.config import PatchScheduleConfig

    provider = (bench_quality.TinyFluxProvider(argparse.Namespace(size=64)) if family == "flux"
                else bench_quality.TinyWanProvider(argparse.Namespace(size=32)))
    model = provider.load()
    seeds = [0, 1, 2]
    _, conds = tr.generate_pool(provider, model, seeds, len(seeds), lambda *a: None)
    schedule = (2, 2, 2, 1)
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, provider.scheduler, provider.steps).float()
    student, _ = tr._build_student(model, binding_for(model), tr.TrainConfig(factors=(2,), rank=4), "cpu",
                                   float(sampling.timestep(torch.tensor(1.0))))
    empty = provider.empty_latent(len(seeds))
    validator = TrajectoryValidator(student, tr._stack, conds, [0, 1, 2], schedule, sigmas, provider.cfg,
                                    cfg_entries(conds, provider.cfg), empty.shape[1:], seed=7, batch=2,
                                    device="cpu", dtype=torch.float32)
    pos, neg = provider.conditioning(seeds)

    def sample(m):
        out = comfy.sample.sample(m, validator.noise, provider.steps, provider.cfg, provider.sampler,
                                  provider.scheduler, pos, neg, empty, seed=0, disable_pbar=True)
        return model.model.process_latent_in(out.float())

    native = sample(model)
    coarse = sample(apply_patch_schedule(model, PatchScheduleConfig(forced_schedule="2x3,1")))
    torch.testing.assert_close(validator.reference, native, rtol=1e-4, atol=1e-4)
    expected = float(((coarse - native) ** 2).mean())
    assert expected > 1e-4  # training-free coarse steps do change the samples
    assert validator.error(student) == pytest.approx(expected, rel=1e-3)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # one peft adapter per factor, by design
def test_validation_keeps_the_best_adapter_and_resumes_its_record(pack, script, tmp_path, capsys, monkeypatch):
    """With --val-every the written adapter is the one of the best validated step (here step 2 of
    6, by a scripted error sequence), bit-identical to a plain 2-step run; the record survives a
    resume; bad settings are refused before any work."""
    from elastic_tokens.training import distill as tr
    from elastic_tokens.ideas.patch.config import format_schedule
    from elastic_tokens.training import validation
    from elastic_tokens.ideas.patch.adapter_file import load_adapter

    with pytest.raises(ValueError, match="validation samples through a forced schedule"):
        tr.TrainConfig(val_every=5)
    with pytest.raises(ValueError, match="val_every must be >= 0 and val_n >= 1"):
        tr.TrainConfig(schedule=(2, 1), val_every=5, val_n=0)
    with pytest.raises(ValueError, match="the validation schedule has 4p steps"):
        tr.TrainConfig(factors=(2,), val_every=5, val_schedule=(4, 1))
    assert format_schedule((2, 2, 2, 1, 4)) == "2x3,1x1,4x1"

    errors = iter([5.0, 1.0, 3.0, 4.0, 2.0])  # steps 0, 2, 4, 6; then 8 after the resume
    monkeypatch.setattr(validation.TrajectoryValidator, "error", lambda self, student: next(errors))
    args = [*FLUX_ARGS, "--schedule", "2x5,1x3", "--val-every", "2", "--val-n", "3"]
    out, ckpt = tmp_path / "best.safetensors", tmp_path / "ckpt"
    summary, log = run(script, capsys, *args, "--steps", "6", "--out", out, "--ckpt", ckpt)
    assert "validation: every 2 steps, 3 held-out noises through 2x5,1x3" in log
    assert "validation at step 0: final-latent MSE 5.00000 to native sampling (training-free)" in log
    assert "kept the adapter of step 2: validation MSE 1.00000 (last step 6: 4.00000)" in log
    record = summary["validation"]
    assert record["history"] == [[0, 5.0], [2, 1.0], [4, 3.0], [6, 4.0]] and record["best_step"] == 2
    assert record["schedule"] == "2x5,1x3" and record["n"] == 3
    assert load_adapter(out).spec.training["val_best_step"] == 2

    plain = tmp_path / "plain.safetensors"
    run(script, capsys, *FLUX_ARGS, "--schedule", "2x5,1x3", "--steps", "2", "--out", plain)
    expected, got = adapter_tensors(plain), adapter_tensors(out)
    assert expected.keys() == got.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    # the checkpoint holds the last state (to go on from) and the validation record
    summary, log = run(script, capsys, *args, "--steps", "8", "--out", out, "--ckpt", ckpt, "--resume")
    assert summary["validation"]["history"][-1] == [8, 2.0] and summary["validation"]["best_step"] == 2
    assert "resumed from" in log and "validation at step 6" not in log


# ----------------------------------------------------------------------------- guided loss, weight average

def test_guided_loss_is_the_error_of_the_cfg_combination(pack):
    """``--guided W`` blends the per-branch velocity MSE with the MSE of ``v_u + s (v_c - v_u)``,
    the velocity the sampler actually steps with; each batch holds both branches of the same noisy
    latents (cond rows first)."""
    import torch.nn.functional as F
    from elastic_tokens.training import distill as tr

    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 4, 3, 3, generator=gen), torch.randn(6, 4, 3, 3, generator=gen)
    branch = F.mse_loss(student, teacher)
    assert torch.equal(tr._loss(student, teacher, 0.0, 3.0), branch)

    def guide(v):
        return v[3:] + 3.0 * (v[:3] - v[3:])
    guided = F.mse_loss(guide(student), guide(teacher))
    torch.testing.assert_close(tr._loss(student, teacher, 1.0, 3.0), guided)
    torch.testing.assert_close(tr._loss(student, teacher, 0.25, 3.0), 0.75 * branch + 0.25 * guided)

    # a batch: both branches of each drawn sample at the same noisy latent and sigma
    cfg = tr.TrainConfig(factors=(2,), schedule=(2, 2, 2, 1), batch=5, guided=1.0)
    conds = [[{"context": torch.full((1, 2, 8), float(i))}, {"context": torch.full((1, 2, 8), -1.0 - i)}]
             for i in range(4)]
    sigmas = {2: torch.tensor([0.9, 0.8, 0.7])}
    x_t, sigma, cond, factor = tr._batch(torch.randn(4, 16, 8, 8), conds, tr._batches_by_shape(conds), sigmas,
                                         cfg, torch.Generator().manual_seed(1), "cpu", torch.float32)
    assert x_t.shape[0] == sigma.shape[0] == cond["context"].shape[0] == 10 and factor == 2
    assert torch.equal(x_t[:5], x_t[5:]) and torch.equal(sigma[:5], sigma[5:])
    c, u = cond["context"][:5, 0, 0], cond["context"][5:, 0, 0]
    assert (c >= 0).all() and torch.equal(u, -1.0 - c)  # uncond of the same samples, in the same order

    with pytest.raises(ValueError, match="guided is a weight in"):
        tr.TrainConfig(guided=1.5)
    with pytest.raises(ValueError, match="samples without CFG"):
        tr._check_guided(conds, 1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        tr._check_guided([[{"context": torch.zeros(1, 2, 8)}, {"context": torch.zeros(1, 3, 8)}]], 3.0)
    tr._check_guided(conds, 3.0)


def test_guided_run_lowers_the_guided_error(pack, script, tiny_flux, tmp_path, capsys):
    """A short --guided run (tiny Flux sampled with CFG 2) brings the coarse step's guided velocity
    closer to the native one on held-out inputs; without CFG the flag is refused before any work."""
    from elastic_tokens.ideas.patch.adapter_file import load_adapter

    out = tmp_path / "guided.safetensors"
    summary, log = run(script, capsys, *FLUX_ARGS, "--cfg", "2", "--guided", "1", "--steps", STEPS, "--out", out)
    assert "loss: 0 x per-branch MSE + 1 x MSE of the guided velocity (cfg 2); 4 samples x 2 branches" in log
    assert load_adapter(out).spec.training["guided"] == 1.0

    x, sigma, cond = eval_batch(tiny_flux)
    _, negative = tiny_models.flux_conditioning(batch=1, seed=0)  # the provider's uncond
    context, extra = negative[0]
    n = x.shape[0]
    uncond = dict(context=context.expand(n, -1, -1), y=extra["pooled_output"].expand(n, -1), guidance=cond["guidance"])

    def guided(velocities_c, velocities_u):
        return velocities_u + 2.0 * (velocities_c - velocities_u)
    vc = sampling_velocities(tiny_flux, load_adapter(out), x, sigma, cond)
    vu = sampling_velocities(tiny_flux, load_adapter(out), x, sigma, uncond)
    native, free, trained = (guided(c, u) for c, u in zip(vc, vu))
    free_error, trained_error = float(((free - native) ** 2).mean()), float(((trained - native) ** 2).mean())
    assert trained_error < 0.8 * free_error, (free_error, trained_error)

    with pytest.raises(ValueError, match="samples without CFG"):
        script.main(FLUX_ARGS + ["--guided", "1", "--steps", "2", "--out", str(tmp_path / "never.safetensors")])
    assert not (tmp_path / "never.safetensors").exists()


def test_weight_average_follows_the_ramped_decay_and_swaps_back(pack):
    from elastic_tokens.training.distill import WeightAverage

    p = torch.nn.Parameter(torch.zeros(3))
    average = WeightAverage({"w": p}, 0.9)
    expected = torch.zeros(3)
    for n, value in enumerate([1.0, 2.0, 3.0, 4.0]):
        with torch.no_grad():
            p.fill_(value)
        average.update({"w": p})
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * value
        torch.testing.assert_close(average.tensors["w"], expected)
    with average.swapped_in({"w": p}):
        torch.testing.assert_close(p.detach(), expected)
    assert torch.equal(p.detach(), torch.full((3,), 4.0))  # the trained weights are back
    restored = WeightAverage({"w": p}, 0.9, average.to_checkpoint())
    assert restored.updates == 4 and torch.equal(restored.tensors["w"], average.tensors["w"])
    with pytest.raises(ValueError, match="ema is a decay in"):
        from elastic_tokens.training.distill import TrainConfig
        TrainConfig(ema=1.0)


def test_ema_run_writes_the_average_and_resumes_it_exactly(pack, script, flux_run, tmp_path, capsys):
    reference, _ = flux_run  # the same run without --ema
    half, args = STEPS // 2, [*FLUX_ARGS, "--ema", "0.9"]
    whole = tmp_path / "whole.safetensors"
    _, log = run(script, capsys, *args, "--steps", STEPS, "--out", whole)
    assert "exponential moving average, decay 0.9" in log
    plain, averaged = adapter_tensors(reference), adapter_tensors(whole)
    assert any(not torch.allclose(plain[k], averaged[k], atol=1e-6) for k in plain)  # the average, not the last

    out, ckpt = tmp_path / "resumed.safetensors", tmp_path / "ckpt"
    run(script, capsys, *args, "--steps", half, "--out", out, "--ckpt", ckpt)
    run(script, capsys, *args, "--steps", STEPS, "--out", out, "--ckpt", ckpt, "--resume")
    got = adapter_tensors(out)
    for key in averaged:
        torch.testing.assert_close(got[key], averaged[key], rtol=0, atol=1e-6, msg=key)


def test_cfg_error_script_measures_the_guided_amplification(pack, flux_run, capsys):
    """bench/cfg_error.py: one row per coarse step of the schedule, the guided error consistent
    with the branch errors and their correlation (|e_u + s(e_c - e_u)|^2 expanded), refusals."""
    spec = importlib.util.spec_from_file_location("cfg_error", REPO / "bench" / "cfg_error.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    adapter, _ = flux_run
    args = ["--model", "tiny-flux", "--size", "64", "--adapter", str(adapter), "--n", "3"]
    rows = module.main(args + ["--schedule", "1x2,2x3,1x3", "--cfg", "2"])
    assert [r["step"] for r in rows] == [2, 3, 4] and all(r["factor"] == 2 for r in rows)
    for r in rows:
        s, mc, mu = 2.0, r["mse_cond"], r["mse_uncond"]
        expanded = s * s * mc + (s - 1) ** 2 * mu - 2 * s * (s - 1) * r["corr"] * math.sqrt(mc * mu)
        assert r["mse_guided"] == pytest.approx(expanded, rel=1e-3) and -1.0 <= r["corr"] <= 1.0
    assert "mse guided" in capsys.readouterr().out
    with pytest.raises(ValueError, match="samples without CFG"):
        module.main(args + ["--schedule", "2x3,1x5"])
    with pytest.raises(ValueError, match="no coarse step"):
        module.main(args + ["--schedule", "1x8", "--cfg", "2"])
