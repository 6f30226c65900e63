"""CPU smoke tests of benchmarks/proxy/train_image_proxy.py (tiny dims, synthetic data, in-process).

* overfit: the loss on one fixed batch falls within a few steps (the model, the autograd-safe
  forward and the optimiser train);
* resume: 3 steps + checkpoint + resume for 3 more gives bit-identical losses to 6 straight steps;
* export: both safetensors files read back through ComfyUI's loader (comfy.utils.load_torch_file)
  and load into ComfyUI's Flux class with strict=True; samples.png has one row per class.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "proxy" / "train_image_proxy.py"
TINY = ["--synthetic", "--hidden", "64", "--heads", "4", "--depth", "1", "--single", "1", "--ctx-dim", "32",
        "--batch", "4", "--log-every", "1", "--sample-steps", "2", "--sample-cols", "1"]


@pytest.fixture(scope="module")
def proxy(comfy):
    spec = importlib.util.spec_from_file_location("_train_image_proxy", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: OpenMP threads only add overhead (and thrash a shared CPU)
    yield mod
    torch.set_num_threads(threads)


def test_overfits_fixed_batch(proxy):
    res = proxy.main(TINY + ["--fixed-batch", "--lr", "3e-3", "--warmup", "1", "--max-steps", "15"])
    losses = [r["loss"] for r in res["log"]]
    assert len(losses) == 15
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses


def test_resume_is_exact(proxy, tmp_path):
    full = proxy.main(TINY + ["--max-steps", "6", "--ckpt", str(tmp_path / "a.pt")])
    proxy.main(TINY + ["--max-steps", "3", "--ckpt", str(tmp_path / "b.pt")])
    ck = torch.load(tmp_path / "b.pt", weights_only=False)
    assert ck["state"]["step"] == 3
    resumed = proxy.main(TINY + ["--max-steps", "6", "--resume", str(tmp_path / "b.pt"),
                                 "--ckpt", str(tmp_path / "c.pt")])
    assert [r["step"] for r in resumed["log"]] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed["log"]] == [r["loss"] for r in full["log"]]
    assert resumed["loss"] == full["loss"]


def test_export_loads_into_comfy_flux(proxy, tmp_path):
    import comfy.ldm.flux.model
    import comfy.ops
    import comfy.utils
    from PIL import Image

    out = tmp_path / "export"
    res = proxy.main(TINY + ["--max-steps", "3", "--export", str(out)])
    sd, meta = comfy.utils.load_torch_file(str(out / "image_proxy.safetensors"), return_metadata=True)
    cfg = json.loads(meta["config"])
    assert cfg == res["config"] and json.loads(meta["elastic_tokens_test_config"]) == cfg
    assert meta["steps"] == "3" and "Fashion-MNIST" in meta["data_recipe"]
    assert all(v.dtype == torch.float16 for v in sd.values())
    model = comfy.ldm.flux.model.Flux(dtype=torch.float32, device="cpu",
                                      operations=comfy.ops.disable_weight_init, **proxy.comfy_flux_kwargs(cfg))
    model.load_state_dict(proxy.model_names(sd, model), strict=True)
    text, tmeta = comfy.utils.load_torch_file(str(out / "image_proxy_text.safetensors"), return_metadata=True)
    assert text["class_tokens"].shape == (11, 4, 32)
    assert len(json.loads(tmeta["class_names"])) == 11
    for name in ("image_proxy.safetensors", "image_proxy_text.safetensors"):
        assert (out / name).stat().st_size < 16 * 2**20
    assert Image.open(out / "samples.png").size == (128, 10 * 128)
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 3 and len(log["log"]) == 3


def test_sharded_export_merges(proxy, tmp_path):
    """Over --shard-mib the model file is split (device machine returns <= 16 MiB a file); --merge rejoins."""
    import comfy.utils

    out = tmp_path / "export"
    proxy.main(TINY + ["--max-steps", "1", "--export", str(out), "--shard-mib", "0.3"])
    parts = sorted(out.glob("image_proxy-*-of-*.safetensors"))
    assert len(parts) >= 2 and not (out / "image_proxy.safetensors").exists()
    assert all(p.stat().st_size < 0.3 * 2**20 for p in parts)
    proxy.main(["--merge", str(out)])
    sd, meta = comfy.utils.load_torch_file(str(out / "image_proxy.safetensors"), return_metadata=True)
    ref = {}
    for p in parts:
        ref.update(comfy.utils.load_torch_file(str(p)))
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    assert "shard" not in meta and json.loads(meta["config"])["hidden_size"] == 64
