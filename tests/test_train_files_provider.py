"""The training command on a user's own model files (``--model files``), through ComfyUI's loaders.

The tiny Flux and Wan models of tests/support are written under FLUX.1-dev's and Wan 2.1's file
names with their text encoders (CLIP-L + T5, umT5), so this runs the same loader / text-encoder /
sampler path the README's FLUX.1-dev and Wan 2.1 commands take, end to end, and checks that the
adapter it writes attaches to the model it was trained on and is refused by the other family.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

CASES = {
    "flux": ("flux1-dev.safetensors", ["clip_l.safetensors", "t5xxl_fp16.safetensors"],
             ["--width", "64", "--height", "64", "--guidance", "3.5"]),
    "wan": ("wan2.1_t2v_1.3B_fp16.safetensors", ["umt5_xxl_fp16.safetensors"],
            ["--width", "32", "--height", "32", "--length", "5", "--cfg", "2"]),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_files_provider_trains_an_adapter_that_attaches(family, pack, tiny_flux, tiny_wan, tmp_path, monkeypatch):
    import tiny_models
    from elastic_tokens.training import cli as train_patch_adapter
    from elastic_tokens.ideas.patch.adapter_file import AdapterError, load_adapter
    from elastic_tokens.ideas.patch.adapter_attach import attach_patch_adapter

    monkeypatch.setenv("ELASTIC_TOKENS_TINY_TEXT_ENCODERS", "1")
    models = tiny_models.DEFAULT_MODELS_DIR
    unet, clips, extra = CASES[family]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\n\na small house\n")  # blank lines are skipped
    out = tmp_path / f"{family}.safetensors"
    argv = ["--model", "files", "--unet", str(models / "diffusion_models" / unet), "--clip-type", family,
            "--prompts", str(prompts), "--out", str(out), "--steps", "3", "--pool", "2", "--gen-batch", "2",
            "--batch", "2", "--rank", "4", "--sample-steps", "4", "--device", "cpu", "--log-every", "3"] + extra
    for clip in clips:
        argv += ["--clip", str(models / "text_encoders" / clip)]
    summary = train_patch_adapter.main(argv)

    assert summary["family"] == family and summary["steps"] == 3 and summary["world_size"] == 1
    assert out.with_suffix(".json").is_file()
    adapter = load_adapter(out)
    assert adapter.spec.family == family and adapter.spec.rank == 4 and adapter.spec.factors == (2,)
    own, other = (tiny_flux, tiny_wan) if family == "flux" else (tiny_wan, tiny_flux)
    attach_patch_adapter(own, adapter, 1.0, out.name)  # the same base weights: accepted
    with pytest.raises(AdapterError, match="trained for a"):
        attach_patch_adapter(other, adapter, 1.0, out.name)


def test_files_provider_needs_its_arguments(comfy, tmp_path):
    from elastic_tokens.training import cli as train_patch_adapter

    with pytest.raises(SystemExit, match="--unet"):
        train_patch_adapter.main(["--model", "files", "--out", str(tmp_path / "a.safetensors")])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(SystemExit, match="no prompts"):
        train_patch_adapter.main(["--model", "files", "--unet", "x", "--clip", "y", "--prompts", str(empty),
                                  "--out", str(tmp_path / "a.safetensors")])
