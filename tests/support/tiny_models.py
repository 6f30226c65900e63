"""Tiny random-weight Flux / Wan 2.1 models (and their text encoders and VAEs) for CPU tests.

The files use the REAL key names and load through ComfyUI's real loaders (UNETLoader,
DualCLIPLoader, CLIPLoader, VAELoader), so a workflow written for the full models runs
unchanged against them. Shapes are derived by instantiating ComfyUI's own classes with the tiny
config on the meta device, never written by hand.

Two things ComfyUI cannot detect from tiny weights are patched by :func:`install_overrides`
(test-only, transparent for every other model):

* the detected diffusion-model config: Flux detection hard-codes the axes [16,56,56] (and 24 heads
  in 0.3.75; 0.33 computes ``hidden_size // sum(axes_dim)``) and Wan detection has no
  ``text_dim``; when the safetensors metadata has ``elastic_tokens_test_config`` (a JSON dict: the
  whole tiny config, so the files do not depend on what one ComfyUI version detects) it updates
  the detected config;
* with ``ELASTIC_TOKENS_TINY_TEXT_ENCODERS=1``: T5-XXL and umT5-XXL are built from a tiny config
  (the real tokenizers stay), and a single tiny umT5 file is detected as T5-XXL (CLIPLoader's
  detection looks at block 23 and d_model 4096).

CLIP-L stays full size (random, fp16, 246 MB on disk, written once into the cache).
The umT5 file carries ComfyUI's own SentencePiece model from ``t5_pile_tokenizer`` as
``spiece_model`` (the real umT5 one lives only inside the 11 GB checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # the support dir, for comfy_runtime
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_runtime  # noqa: E402

META_KEY = "elastic_tokens_test_config"
VERSION_KEY = "elastic_tokens_tiny_version"
TINY_TE_ENV = "ELASTIC_TOKENS_TINY_TEXT_ENCODERS"
FORMAT_VERSION = "1"  # bump to force every cached model file to be rewritten
DEFAULT_MODELS_DIR = comfy_runtime.REPO_ROOT / ".runtime" / "models"

TEXT_DIM = 64  # d_model of the tiny T5 / umT5 = Flux context_in_dim = Wan text_dim
TINY_T5 = {"d_model": TEXT_DIM, "d_kv": 16, "num_heads": 4, "d_ff": 128, "num_layers": 2,
           "num_decoder_layers": 2}
TINY_UMT5 = dict(TINY_T5, vocab_size=32000)  # the SentencePiece model shipped with ComfyUI

TINY_FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
             "context_in_dim": TEXT_DIM, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2,
             "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000,
             "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
TINY_WAN = {"image_model": "wan2.1", "model_type": "t2v", "dim": 128, "num_heads": 1, "ffn_dim": 256,
            "num_layers": 2, "text_dim": TEXT_DIM, "in_dim": 16, "out_dim": 16, "freq_dim": 256}
WAN_VAE_DIM = 8  # the real one is 96; ComfyUI reads it from decoder.head.0.gamma
# Later members of the two families, loaded in-process only (load_tiny_family): Flux.2 (global
# modulation, SiLU-gated MLPs, no biases, 4 RoPE axes, patch 1 on a 128-channel latent at /16) and
# Wan 2.2 TI2V 5B (48-channel latent at /16). Flux Kontext is the tiny Flux with reference latents.
TINY_FLUX2 = {"image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None,
              "context_in_dim": TEXT_DIM, "hidden_size": 64, "mlp_ratio": 3.0, "num_heads": 2, "depth": 2,
              "depth_single_blocks": 2, "axes_dim": [8, 8, 8, 8], "theta": 2000, "patch_size": 1,
              "qkv_bias": False, "guidance_embed": True, "global_modulation": True, "mlp_silu_act": True,
              "ops_bias": False}
TINY_WAN22_5B = dict(TINY_WAN, in_dim=48, out_dim=48)

FLUX_FILE = "diffusion_models/flux1-dev.safetensors"
WAN_FILE = "diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors"
T5_FILE = "text_encoders/t5xxl_fp16.safetensors"
CLIP_L_FILE = "text_encoders/clip_l.safetensors"
UMT5_FILE = "text_encoders/umt5_xxl_fp16.safetensors"
FLUX_VAE_FILE = "vae/ae.safetensors"
WAN_VAE_FILE = "vae/wan_2.1_vae.safetensors"


# --------------------------------------------------------------------------- overrides

def _tiny_text_encoders() -> bool:
    return os.environ.get(TINY_TE_ENV) == "1"


def _xxl_config(json_name: str) -> dict:
    import comfy.text_encoders.t5

    with open(Path(comfy.text_encoders.t5.__file__).parent / json_name) as f:
        config = json.load(f)
    config.update(TINY_UMT5 if json_name.startswith("umt5") else TINY_T5)
    return config


def install_overrides() -> None:
    """Patch ComfyUI for the tiny models (see module docstring). Idempotent; needs comfy importable."""
    import comfy.model_detection as md
    import comfy.sd
    import comfy.sd1_clip as sd1_clip

    if not getattr(md.detect_unet_config, "_elastic_tokens_tiny", False):
        orig_detect = md.detect_unet_config

        def detect_unet_config(state_dict, key_prefix, metadata=None):
            config = orig_detect(state_dict, key_prefix, metadata=metadata)
            if config is not None and metadata and META_KEY in metadata:
                config.update(json.loads(metadata[META_KEY]))
            return config

        detect_unet_config._elastic_tokens_tiny = True
        detect_unet_config._orig = orig_detect
        md.detect_unet_config = detect_unet_config

    if not getattr(sd1_clip.SDClipModel.__init__, "_elastic_tokens_tiny", False):
        orig_init = sd1_clip.SDClipModel.__init__

        def __init__(self, *args, textmodel_json_config=None, **kwargs):
            name = os.path.basename(textmodel_json_config) if isinstance(textmodel_json_config, str) else None
            if name in ("t5_config_xxl.json", "umt5_config_xxl.json") and _tiny_text_encoders():
                textmodel_json_config = _xxl_config(name)
            orig_init(self, *args, textmodel_json_config=textmodel_json_config, **kwargs)

        __init__._elastic_tokens_tiny = True
        sd1_clip.SDClipModel.__init__ = __init__

    if not getattr(comfy.sd.detect_te_model, "_elastic_tokens_tiny", False):
        orig_te = comfy.sd.detect_te_model

        def detect_te_model(sd):
            found = orig_te(sd)
            w = sd.get("encoder.block.0.layer.1.DenseReluDense.wi_1.weight")
            if (_tiny_text_encoders() and found in (None, comfy.sd.TEModel.T5_BASE) and w is not None
                    and w.shape[-1] == TEXT_DIM):
                return comfy.sd.TEModel.T5_XXL
            return found

        detect_te_model._elastic_tokens_tiny = True
        comfy.sd.detect_te_model = detect_te_model


# --------------------------------------------------------------------------- state dicts

def _meta_state_dict(module: torch.nn.Module) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


def flux_kwargs(config: dict, where_known: dict | None = None) -> dict:
    """``config`` as keyword arguments for the running ComfyUI's ``Flux`` class.

    ``where_known``: fields passed only where this ComfyUI's ``FluxParams`` has them (e.g. Flux 2's
    ``txt_ids_dims=[3]``). Fields that a version requires and the config leaves out get FLUX.1's
    value (0.33: ``txt_ids_dims=[]``, what its detection gives FLUX.1), so one config builds on
    every version.
    """
    import dataclasses

    import comfy.ldm.flux.model

    fields = {f.name: f for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    kwargs = {k: v for k, v in config.items() if k != "image_model"}
    kwargs.update({k: v for k, v in (where_known or {}).items() if k in fields})
    flux1_values = {"txt_ids_dims": []}
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in kwargs and name in flux1_values:
            kwargs[name] = list(flux1_values[name])
    return kwargs


def _flux_shapes() -> dict:
    import comfy.ldm.flux.model
    import comfy.ops

    shapes = _meta_state_dict(comfy.ldm.flux.model.Flux(device="meta", dtype=torch.float32,
                                                        operations=comfy.ops.disable_weight_init,
                                                        **flux_kwargs(TINY_FLUX)))
    # the released FLUX.1 files name the QK-norm weights ``*_norm.scale`` (0.3.75's module names);
    # 0.33's modules call them ``*_norm.weight`` and its loader renames ``scale`` on load
    return {(k[:-len("weight")] + "scale" if k.endswith(("query_norm.weight", "key_norm.weight")) else k): v
            for k, v in shapes.items()}


def _flux2_shapes() -> dict:
    import comfy.ldm.flux.model
    import comfy.ops

    shapes = _meta_state_dict(comfy.ldm.flux.model.Flux(device="meta", dtype=torch.float32,
                                                        operations=comfy.ops.disable_weight_init,
                                                        **flux_kwargs(TINY_FLUX2, {"txt_ids_dims": [3]})))
    return {(k[:-len("weight")] + "scale" if k.endswith(("query_norm.weight", "key_norm.weight")) else k): v
            for k, v in shapes.items()}


def _wan_shapes(config: dict = TINY_WAN) -> dict:
    import comfy.ldm.wan.model
    import comfy.ops

    cfg = {k: v for k, v in config.items() if k != "image_model"}
    return _meta_state_dict(comfy.ldm.wan.model.WanModel(device="meta", dtype=torch.float32,
                                                         operations=comfy.ops.disable_weight_init, **cfg))


def _t5_shapes(json_name: str) -> dict:
    import comfy.ops
    import comfy.text_encoders.t5

    return _meta_state_dict(comfy.text_encoders.t5.T5(_xxl_config(json_name), torch.float32, "meta",
                                                      comfy.ops.disable_weight_init))


def _clip_l_shapes() -> dict:
    import comfy.clip_model
    import comfy.ops
    import comfy.sd1_clip

    with open(Path(comfy.sd1_clip.__file__).parent / "sd1_clip_config.json") as f:
        config = json.load(f)
    return _meta_state_dict(comfy.clip_model.CLIPTextModel(config, torch.float32, "meta",
                                                           comfy.ops.disable_weight_init))


def _flux_vae_shapes() -> dict:
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        m = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
    return _meta_state_dict(m)


def _wan_vae_shapes() -> dict:
    import comfy.ldm.wan.vae

    with torch.device("meta"):
        m = comfy.ldm.wan.vae.WanVAE(dim=WAN_VAE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                     attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)
    return _meta_state_dict(m)


def _spiece_model() -> torch.Tensor:
    import comfy.text_encoders.t5

    data = (Path(comfy.text_encoders.t5.__file__).parent / "t5_pile_tokenizer" / "tokenizer.model").read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def random_weights(shapes: dict, seed: int, dtype=torch.float32) -> dict:
    """Deterministic small-std weights: norms/scales 1, biases 0, the rest N(0, 0.5/sqrt(fan_in))."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape, _ = shapes[name]
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("gamma", "scale") or (leaf == "weight" and len(shape) == 1):
            t = torch.ones(shape)
        elif leaf in ("bias", "beta") or len(shape) == 0:
            t = torch.zeros(shape)
        else:
            fan_in = max(1, int(torch.Size(shape).numel() // shape[0]))
            t = torch.randn(shape, generator=gen) * (0.5 / fan_in ** 0.5)
        out[name] = t.to(dtype).contiguous()
    return out


def _test_config(state_dict: dict, wanted: dict) -> dict:
    """The tiny config for the metadata: all of it, not only what this ComfyUI's detection gets
    wrong (which differs between versions), so one file serves every version. Checks that the
    unpatched detection finds the family at all."""
    import comfy.model_detection as md

    detect = getattr(md.detect_unet_config, "_orig", md.detect_unet_config)
    detected = detect(state_dict, "", metadata=None)
    if detected is None or detected.get("image_model") != wanted["image_model"]:
        raise RuntimeError(f"ComfyUI does not detect the tiny {wanted['image_model']} model: {detected}")
    return dict(wanted)


# name -> (relative path, builder returning (state_dict, metadata))
def _specs() -> dict:
    def flux():
        sd = random_weights(_flux_shapes(), seed=1)
        return sd, {META_KEY: json.dumps(_test_config(sd, TINY_FLUX))}

    def wan():
        sd = random_weights(_wan_shapes(), seed=2)
        return sd, {META_KEY: json.dumps(_test_config(sd, TINY_WAN))}

    def t5():
        return random_weights(_t5_shapes("t5_config_xxl.json"), seed=3), {}

    def umt5():
        sd = random_weights(_t5_shapes("umt5_config_xxl.json"), seed=4)
        sd["spiece_model"] = _spiece_model()
        return sd, {}

    def clip_l():
        return random_weights(_clip_l_shapes(), seed=5, dtype=torch.float16), {}

    def flux_vae():
        return random_weights(_flux_vae_shapes(), seed=6, dtype=torch.float16), {}

    def wan_vae():
        return random_weights(_wan_vae_shapes(), seed=7), {}

    return {"flux": (FLUX_FILE, flux, TINY_FLUX), "wan": (WAN_FILE, wan, TINY_WAN),
            "t5": (T5_FILE, t5, TINY_T5), "umt5": (UMT5_FILE, umt5, TINY_UMT5),
            "clip_l": (CLIP_L_FILE, clip_l, {}), "flux_vae": (FLUX_VAE_FILE, flux_vae, {}),
            "wan_vae": (WAN_VAE_FILE, wan_vae, {"dim": WAN_VAE_DIM})}


def _version_tag(name: str, config: dict) -> str:
    src = Path(__file__).read_bytes()
    blob = json.dumps([FORMAT_VERSION, name, config], sort_keys=True).encode() + src
    return hashlib.sha256(blob).hexdigest()[:16]


def _current_tag(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(VERSION_KEY)
    except Exception:
        return None


def write_example_models(models_dir: Path = DEFAULT_MODELS_DIR) -> Path:
    """Write every file the example workflows load (see *_FILE); skips up-to-date files."""
    from safetensors.torch import save_file

    models_dir = Path(models_dir)
    for name, (rel, build, config) in _specs().items():
        path = models_dir / rel
        tag = _version_tag(name, config)
        if path.is_file() and _current_tag(path) == tag:
            continue
        comfy_runtime.bootstrap()
        sd, metadata = build()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(sd, str(tmp), metadata={**metadata, VERSION_KEY: tag})
        os.replace(tmp, path)
    return models_dir


# --------------------------------------------------------------------------- in-process helpers

def _load_diffusion_model(rel: str, models_dir: Path):
    comfy_runtime.bootstrap()
    install_overrides()
    write_example_models(models_dir)
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(Path(models_dir) / rel))


def load_tiny_flux(models_dir: Path = DEFAULT_MODELS_DIR):
    """The tiny Flux as a ModelPatcher, loaded as UNETLoader does."""
    return _load_diffusion_model(FLUX_FILE, models_dir)


def load_tiny_wan(models_dir: Path = DEFAULT_MODELS_DIR):
    """The tiny Wan 2.1 t2v as a ModelPatcher, loaded as UNETLoader does."""
    return _load_diffusion_model(WAN_FILE, models_dir)


def load_tiny_family(name: str):
    """``"flux2"`` or ``"wan22_5b"`` as a ModelPatcher, through ComfyUI's own detection and loader
    (``load_diffusion_model_state_dict``, what UNETLoader calls), built in memory."""
    comfy_runtime.bootstrap()
    install_overrides()
    import comfy.sd

    shapes, config, seed = {"flux2": (_flux2_shapes, TINY_FLUX2, 21),
                            "wan22_5b": (lambda: _wan_shapes(TINY_WAN22_5B), TINY_WAN22_5B, 22)}[name]
    sd = random_weights(shapes(), seed=seed)
    model = comfy.sd.load_diffusion_model_state_dict(sd, metadata={META_KEY: json.dumps(_test_config(sd, config))})
    if model is None:
        raise RuntimeError(f"ComfyUI could not load the tiny {name}")
    return model


def flux_conditioning(tokens: int = 8, batch: int = 1, guidance: float = 3.5, seed: int = 0):
    """``(positive, negative)`` in ComfyUI's CONDITIONING format for the tiny Flux."""
    gen = torch.Generator().manual_seed(seed)

    def cond():
        return [[torch.randn(batch, tokens, TEXT_DIM, generator=gen),
                 {"pooled_output": torch.randn(batch, TINY_FLUX["vec_in_dim"], generator=gen),
                  "guidance": guidance}]]

    return cond(), cond()


def wan_conditioning(tokens: int = 8, batch: int = 1, seed: int = 0):
    """``(positive, negative)`` in ComfyUI's CONDITIONING format for the tiny Wan."""
    gen = torch.Generator().manual_seed(seed)
    return ([[torch.randn(batch, tokens, TEXT_DIM, generator=gen), {}]],
            [[torch.randn(batch, tokens, TEXT_DIM, generator=gen), {}]])


def flux_latent(width: int = 64, height: int = 64, batch: int = 1) -> dict:
    """An empty LATENT as EmptySD3LatentImage makes it (16 channels, /8)."""
    return {"samples": torch.zeros(batch, 16, height // 8, width // 8)}


def wan_latent(width: int = 64, height: int = 64, length: int = 9, batch: int = 1) -> dict:
    """An empty LATENT as EmptyHunyuanLatentVideo makes it for Wan (16 ch, time /4, space /8)."""
    return {"samples": torch.zeros(batch, 16, (length - 1) // 4 + 1, height // 8, width // 8)}


def latent_for(model, width: int = 64, height: int = 64, length: int | None = None, batch: int = 1) -> dict:
    """An empty LATENT for ``model``'s own latent format (channels and spatial ratio), images or
    (``length`` frames) video with time /4, as the Empty*Latent nodes make them."""
    fmt = model.get_model_object("latent_format")
    ratio = getattr(fmt, "spacial_downscale_ratio", 8)
    shape = (batch, fmt.latent_channels, height // ratio, width // ratio)
    if length is not None:
        shape = shape[:2] + ((length - 1) // 4 + 1,) + shape[2:]
    return {"samples": torch.zeros(shape)}
