"""Smoke tests of the test runtime itself: real ComfyUI on CPU, tiny models, the server harness.

If these fail, every other in-process or server test is meaningless, so they check the plumbing
(not the pack's nodes): the tiny models load through ComfyUI's real loaders and sample through the
real KSampler path quickly with finite outputs, and a real server lists the built-in nodes.
"""

import time

import pytest
import torch

import comfy_runtime
import tiny_models


def test_bootstrap_gives_builtin_and_extra_nodes_on_cpu(comfy):
    import comfy.model_management as mm
    import nodes

    assert (comfy / "nodes.py").resolve() == __import__("pathlib").Path(nodes.__file__).resolve()
    assert mm.cpu_state == mm.CPUState.CPU
    for name in ("KSampler", "UNETLoader", "DualCLIPLoader", "CLIPLoader", "VAELoader",
                 "EmptySD3LatentImage", "EmptyHunyuanLatentVideo", "EasyCache", "FluxGuidance"):
        assert name in nodes.NODE_CLASS_MAPPINGS, name
    assert comfy_runtime.bootstrap() == comfy  # idempotent


def test_load_pack_registers_elastic_tokens(pack):
    import sys

    assert pack.__name__ == "elastic_tokens"
    assert sys.modules["elastic_tokens"] is pack
    assert comfy_runtime.load_pack() is pack


def test_overrides_are_idempotent_and_transparent(comfy):
    import comfy.model_detection as md

    tiny_models.install_overrides()
    wrapped = md.detect_unet_config
    tiny_models.install_overrides()
    assert md.detect_unet_config is wrapped
    sd = tiny_models.random_weights(tiny_models._flux_shapes(), seed=0)
    plain = md.detect_unet_config(sd, "")  # no metadata: ComfyUI's own answer, whatever the version
    assert plain == wrapped._orig(sd, "", metadata=None) and plain["axes_dim"] == [16, 56, 56]
    meta = {tiny_models.META_KEY: '{"num_heads": 2, "axes_dim": [8, 12, 12]}'}
    tiny = md.detect_unet_config(sd, "", metadata=meta)
    assert (tiny["num_heads"], tiny["axes_dim"]) == (2, [8, 12, 12])


def _sample(model, positive, negative, latent, cfg):
    import nodes

    t0 = time.perf_counter()
    (out,) = nodes.common_ksampler(model, 7, 4, cfg, "euler", "simple", positive, negative, latent)
    return out["samples"], time.perf_counter() - t0


def test_tiny_flux_samples_through_ksampler(tiny_flux):
    params = tiny_flux.model.diffusion_model.params
    assert (params.hidden_size, params.num_heads, params.axes_dim) == (64, 2, [8, 12, 12])
    assert type(tiny_flux.model.model_config).__name__ == "Flux"
    pos, neg = tiny_models.flux_conditioning()
    samples, seconds = _sample(tiny_flux, pos, neg, tiny_models.flux_latent(64, 64), cfg=1.0)
    assert samples.shape == (1, 16, 8, 8)
    assert torch.isfinite(samples).all() and samples.abs().sum() > 0
    assert seconds < 10, f"tiny Flux took {seconds:.2f}s for 4 steps"


def test_tiny_wan_samples_through_ksampler(tiny_wan):
    dm = tiny_wan.model.diffusion_model
    assert (dm.dim, dm.num_heads, len(dm.blocks)) == (128, 1, 2)
    assert type(tiny_wan.model.model_config).__name__ == "WAN21_T2V"
    pos, neg = tiny_models.wan_conditioning()
    samples, seconds = _sample(tiny_wan, pos, neg, tiny_models.wan_latent(64, 64, 9), cfg=5.0)
    assert samples.shape == (1, 16, 3, 8, 8)
    assert torch.isfinite(samples).all() and samples.abs().sum() > 0
    assert seconds < 10, f"tiny Wan took {seconds:.2f}s for 4 steps"


def test_text_encoders_and_vaes_load_through_real_loader_nodes(comfy):
    import nodes

    tiny_models.install_overrides()
    comfy_runtime.register_models_dir(tiny_models.write_example_models())
    clip = nodes.DualCLIPLoader().load_clip("t5xxl_fp16.safetensors", "clip_l.safetensors", "flux")[0]
    (cond,) = nodes.CLIPTextEncode().encode(clip, "a red fox")
    assert cond[0][0].shape[-1] == tiny_models.TEXT_DIM
    assert cond[0][1]["pooled_output"].shape == (1, 768)
    umt5 = nodes.CLIPLoader().load_clip("umt5_xxl_fp16.safetensors", "wan")[0]
    (cond,) = nodes.CLIPTextEncode().encode(umt5, "a red fox")
    assert cond[0][0].shape[-1] == tiny_models.TEXT_DIM

    vae = nodes.VAELoader().load_vae("ae.safetensors")[0]
    (img,) = nodes.VAEDecode().decode(vae, {"samples": torch.randn(1, 16, 8, 8)})
    assert img.shape == (1, 64, 64, 3) and torch.isfinite(img).all()
    wan_vae = nodes.VAELoader().load_vae("wan_2.1_vae.safetensors")[0]
    (video,) = nodes.VAEDecode().decode(wan_vae, {"samples": torch.randn(1, 16, 3, 8, 8)})
    assert video.shape == (9, 64, 64, 3) and torch.isfinite(video).all()


def test_example_models_are_cached(comfy):
    models = tiny_models.write_example_models()
    stamps = {p: p.stat().st_mtime_ns for p in models.rglob("*.safetensors")}
    assert len(stamps) == 7
    t0 = time.perf_counter()
    tiny_models.write_example_models()
    assert time.perf_counter() - t0 < 1.0
    assert stamps == {p: p.stat().st_mtime_ns for p in models.rglob("*.safetensors")}


# ------------------------------------------------------------------------------ server

def test_server_lists_builtin_nodes(comfy_server):
    info = comfy_server.object_info()
    assert "KSampler" in info and "EasyCache" in info
    assert comfy_server.object_info("KSampler")["KSampler"]["output"] == ["LATENT"]
    vaes = info["VAELoader"]["input"]["required"]["vae_name"][0]
    assert {"ae.safetensors", "wan_2.1_vae.safetensors"} <= set(vaes)
    assert "Cannot import" not in "\n".join(
        line for line in comfy_server.log_text().splitlines() if "elastic_tokens_tiny_models" in line)


def test_server_rejects_an_invalid_prompt_with_node_errors(comfy_server):
    from comfy_server import ComfyError

    with pytest.raises(ComfyError) as err:
        comfy_server.queue({"1": {"class_type": "KSampler", "inputs": {"seed": 0}},
                            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}})
    assert "HTTP 400" in str(err.value) and "node_errors" in err.value.details


def _flux_prompt():
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl_fp16.safetensors",
                                                         "clip_name2": "clip_l.safetensors", "type": "flux"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a red fox"}},
        "4": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["3", 0], "guidance": 3.5}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["4", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": 1, "steps": 4, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "7": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["7", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "tiny_flux"}},
    }


def _wan_prompt():
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5_xxl_fp16.safetensors", "type": "wan"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a red fox"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": ""}},
        "5": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 9,
                                                                  "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": 1, "steps": 4, "cfg": 5.0,
                                                   "sampler_name": "uni_pc", "scheduler": "simple", "denoise": 1.0}},
        "7": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["7", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "tiny_wan"}},
    }


@pytest.mark.parametrize("family,frames", [("flux", 1), ("wan", 9)])
def test_server_runs_a_tiny_workflow_end_to_end(comfy_server, family, frames):
    prompt = _flux_prompt() if family == "flux" else _wan_prompt()
    entry = comfy_server.run(prompt, timeout=120)
    files = comfy_server.output_files(entry, "9")
    assert len(files) == frames and all(f.is_file() and f.stat().st_size > 0 for f in files)
