"""CPU smoke tests of the video proxy: benchmarks/proxy/train_video_proxy.py (tiny dims, synthetic
data, in-process) and benchmarks/proxy/video_provider.py (on a tiny random model).

* clips: make_clips is deterministic given the generator, in [-1, 1], 9 frames that actually move;
  to_latent / to_frames are exact inverses and give Wan's (B, 16, F, 16, 16) layout;
* overfit: the loss on one fixed batch falls within a few steps;
* resume: 3 steps + checkpoint + resume for 3 more gives bit-identical losses to 6 straight steps;
* export: the fp16 file is detected by ComfyUI's OWN Wan detection (no test override, no config
  metadata read) as WAN21_T2V / WanModel with the trainer's config (heads = dim // 128, text_dim
  4096) and loads without missing or unexpected keys; text tokens, samples.png (rows = clips,
  columns = frames), data.png, train_log.json; sharding + --merge;
* provider: the KSampler path (comfy.sample.sample, euler/simple, CFG, ModelSamplingSD3 shift from
  the file) matches the trainer's own Euler sampler on the same noise after process_latent_out is
  undone (measured 2e-6; the schedules agree exactly); without the inverse the gap is ~10 (Wan's
  per-channel latent mean/std), so the check has teeth.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

PROXY = Path(__file__).resolve().parents[1] / "benchmarks" / "proxy"
SCRIPT = PROXY / "train_video_proxy.py"
TINY = ["--synthetic", "--dim", "128", "--layers", "1", "--ffn", "256", "--batch", "2", "--log-every", "1",
        "--sample-steps", "2", "--sample-clips", "1"]


@pytest.fixture(scope="module")
def proxy(comfy):
    spec = importlib.util.spec_from_file_location("_et_train_video_proxy", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 4))
    yield mod
    torch.set_num_threads(threads)


def test_clips_and_latent_layout(proxy):
    imgs = (torch.rand(6, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    a, kind = proxy.make_clips(imgs, torch.Generator().manual_seed(3), return_kind=True)
    b = proxy.make_clips(imgs, torch.Generator().manual_seed(3))
    assert a.shape == (6, 9, 64, 64) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    assert set(kind.tolist()) <= {0, 1, 2}
    assert ((a[:, -1] - a[:, 0]).abs().mean(dim=(1, 2)) > 1e-3).all()  # every clip moves
    lat = proxy.to_latent(a)
    assert lat.shape == (6, 16, 9, 16, 16)
    assert torch.equal(proxy.to_frames(lat)[:, :, 0], a)
    assert torch.equal(lat[:, :, 4], torch.nn.functional.pixel_unshuffle(a[:, 4:5], 4))


def test_sigmas_are_comfy_simple_schedule(proxy):
    import comfy.model_sampling
    import comfy.samplers

    class MS(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    for shift in (3.0, 8.0):
        ms = MS()
        ms.set_parameters(shift=shift, multiplier=1000)
        for steps in (4, 30):
            assert torch.equal(comfy.samplers.calculate_sigmas(ms, "simple", steps).float(),
                               proxy.wan_sigmas(steps, shift))


def test_overfits_fixed_batch(proxy):
    res = proxy.main(TINY + ["--fixed-batch", "--lr", "3e-3", "--warmup", "1", "--max-steps", "12"])
    losses = [r["loss"] for r in res["log"]]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses


def test_resume_is_exact(proxy, tmp_path):
    full = proxy.main(TINY + ["--max-steps", "6", "--ckpt", str(tmp_path / "a.pt")])
    proxy.main(TINY + ["--max-steps", "3", "--ckpt", str(tmp_path / "b.pt")])
    assert torch.load(tmp_path / "b.pt", weights_only=False)["state"]["step"] == 3
    resumed = proxy.main(TINY + ["--max-steps", "6", "--resume", str(tmp_path / "b.pt"),
                                 "--ckpt", str(tmp_path / "c.pt")])
    assert [r["step"] for r in resumed["log"]] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed["log"]] == [r["loss"] for r in full["log"]]
    assert resumed["loss"] == full["loss"]


def test_export_detected_by_comfy_as_wan(proxy, tmp_path):
    import comfy.ldm.wan.model
    import comfy.model_detection as md
    import comfy.sd
    import comfy.utils
    from PIL import Image

    out = tmp_path / "export"
    res = proxy.main(TINY + ["--max-steps", "2", "--export", str(out)])
    sd, meta = comfy.utils.load_torch_file(str(out / "video_proxy.safetensors"), return_metadata=True)
    cfg = json.loads(meta["config"])
    assert cfg == json.loads(json.dumps(res["config"])) and cfg["num_heads"] == 1 and cfg["text_dim"] == 4096
    assert "elastic_tokens_test_config" not in meta  # nothing for a detection override to read
    assert meta["steps"] == "2" and "Fashion-MNIST" in meta["data_recipe"] and meta["sampling_shift"] == "3.0"
    assert all(v.dtype == torch.float16 for v in sd.values())
    detect = getattr(md.detect_unet_config, "_orig", md.detect_unet_config)  # ComfyUI's own, unpatched
    det = detect(sd, "")
    for k in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "freq_dim", "model_type"):
        assert det[k] == cfg[k], k
    assert list(det["patch_size"]) == cfg["patch_size"] and det["image_model"] == "wan2.1"
    mp = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": torch.float32})
    dm = mp.model.diffusion_model
    assert type(dm) is comfy.ldm.wan.model.WanModel and type(mp.model.model_config).__name__ == "WAN21_T2V"
    assert (dm.dim, dm.num_heads, dm.ffn_dim, dm.num_layers, dm.text_dim) == (128, 1, 256, 1, 4096)
    missing, unexpected = dm.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    assert not missing and not unexpected
    assert torch.equal(dm.blocks[0].ffn[0].weight.half(), sd["blocks.0.ffn.0.weight"])
    text, tmeta = comfy.utils.load_torch_file(str(out / "video_proxy_text.safetensors"), return_metadata=True)
    assert text["class_tokens"].shape == (11, 4, 4096) and len(json.loads(tmeta["class_names"])) == 11
    assert Image.open(out / "samples.png").size == (9 * 64, 10 * 64)
    assert Image.open(out / "data.png").size == (9 * 64, 12 * 64)
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 2 and len(log["log"]) == 2


def test_sharded_export_merges(proxy, tmp_path):
    import comfy.utils

    out = tmp_path / "export"
    proxy.main(TINY + ["--max-steps", "1", "--export", str(out), "--shard-mib", "0.8"])
    parts = sorted(out.glob("video_proxy-*-of-*.safetensors"))
    assert len(parts) >= 2 and not (out / "video_proxy.safetensors").exists()
    assert (out / "video_proxy_text.safetensors").exists()
    proxy.main(["--merge", str(out)])
    sd, meta = comfy.utils.load_torch_file(str(out / "video_proxy.safetensors"), return_metadata=True)
    ref = {}
    for p in parts:
        ref.update(comfy.utils.load_torch_file(str(p)))
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    assert "shard" not in meta and json.loads(meta["config"])["dim"] == 128


def test_provider_ksampler_matches_trainer(proxy, tmp_path):
    """A tiny RANDOM model (head not zero, so the output depends on everything), exported as the
    trainer exports, loaded by the provider through ComfyUI; 4 steps, CFG 3, shift 3."""
    from safetensors.torch import save_file

    sys.path.insert(0, str(PROXY))
    import video_provider as vp

    args = proxy.parse_args(TINY)
    cfg = proxy.wan_config(args)
    torch.manual_seed(0)
    model = proxy.build_model(cfg, "cpu")
    with torch.no_grad():
        model.head.head.weight.normal_(0.0, 0.05)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "video_proxy.safetensors"), metadata={"config": json.dumps(cfg), "sampling_shift": "3.0"})
    save_file({"class_tokens": torch.randn(11, 4, 4096).half()}, str(tmp_path / "video_proxy_text.safetensors"),
              metadata={"class_names": json.dumps(proxy.CLASS_NAMES + ["<empty>"])})
    p = vp.make_provider(weights=tmp_path / "video_proxy.safetensors", dtype="fp32")
    p.load()
    assert p._model.get_model_object("model_sampling").shift == 3.0
    r = vp.compare_with_trainer(p, [1, 7, vp.EMPTY], steps=4, cfg=3.0)
    assert r["max_abs_sigmas"] == 0.0
    assert r["max_abs_raw"] < 1e-4, r["max_abs_raw"]
    assert r["max_abs_raw_without_inverse"] > 1.0
    img = p.decode(r["comfy_out"])
    assert img.shape == (3, 3, 192, 192) and 0 <= float(img.min()) and float(img.max()) <= 1
    frames = p.decode_frames(r["comfy_out"])
    assert frames.shape == (3, 9, 3, 64, 64)
    pos, neg = p.conditioning([0, 13])
    assert pos[0][0].shape == (2, 4, 4096) and torch.equal(neg[0][0][0], p.class_tokens[vp.EMPTY])
