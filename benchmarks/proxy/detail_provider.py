"""The detail proxy (benchmarks/proxy/train_detail_proxy.py) as a ``bench/bench_quality.py`` model
provider, its random-weight twin, and held-out procedural scenes as the real-image set.

    python bench/bench_quality.py --model detail-proxy --n 8 --steps 8          # shorthand for
    python bench/bench_quality.py --model benchmarks/proxy/detail_provider.py:make_provider \\
        --real benchmarks/proxy/detail_provider.py:make_real --n 8 --steps 8
    python bench/bench_quality.py --model detail-proxy-random --settings "" ...  # the random-weight row

Model (:func:`make_provider`)
-----------------------------
``detail_proxy.safetensors`` (fp16 Flux weights; the Flux kwargs in its metadata ``config``) and
``detail_proxy_text.safetensors`` beside it, loaded exactly as the image proxy's
(``image_provider.ImageProxyProvider``: ComfyUI's ``supported_models.Flux`` with the file's config,
strict load, stock FLUX latent format and ModelSamplingFlux shift 1.15; float32 on CPU, bf16 on
CUDA; ``ELASTIC_TOKENS_PROXY_DTYPE`` overrides). Path: ``ELASTIC_TOKENS_DETAIL_WEIGHTS``, default
benchmarks/proxy/detail_proxy.safetensors. Sampling: 28 steps, euler / simple, cfg 3.0; seed ``s``
gets class ``s % 10`` (texture family x layout, ``detail_scenes``), negative = the empty class.
Latent 16x64x64 (what ``EmptySD3LatentImage`` gives for 512x512; 1024 image tokens); decode
undoes ``process_latent_out`` (see image_provider's docstring: an empty input latent reaches the
model raw) and ``pixel_shuffle(4)`` -> 256x256 gray as RGB.

Random weights (:func:`make_random_provider`)
---------------------------------------------
The same architecture (the trained file's ``config`` when that file exists, else the trainer's
default), weights drawn as the trainer initialises them (Linear N(0, 0.02), biases 0, QK-norm
scales 1) except that the final layer is random too (the trainer starts it at zero, which would make
the velocity exactly 0), and class tokens N(0, 1); seed 0 (``ELASTIC_TOKENS_RANDOM_SEED``). The
bench's "random-weight model" row: how far from the real scenes an untrained model of this class is.

Real images (:func:`make_real`)
-------------------------------
Held-out scenes of the weights' grammar (their metadata ``grammar``, ``free`` when absent; the
same env variable picks the file): image ``i`` is reference scene ``i`` (seed 10^9 + i, class i % 10 = the class
of the benchmark's seed i), a seed range the trainer never draws (``detail_scenes``), rendered at
256x256 (the provider's decoded size) and quantised to uint8 gray as RGB. Rendered on CUDA when the
benchmark runs there (``--device cuda``; float32 rounding may move a pixel by one level against a
CPU render), else on the CPU (~85 ms a scene on one core).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for _p in (REPO / "bench", REPO / "tests" / "support", HERE):  # HERE: sibling proxy modules
    if str(_p) not in sys.path:
        sys.path.append(str(_p))

import image_provider as ip  # noqa: E402

WEIGHTS = HERE / "detail_proxy.safetensors"
TEXT_FILE = "detail_proxy_text.safetensors"
EMPTY = 10
HOW_TO_MAKE = ("train it: python3 benchmarks/proxy/train_detail_proxy.py --minutes 9 --batch 256 --export OUT on a GPU "
               "(BENCHMARKS.md section 3 has the committed proxy's command), then copy OUT/detail_proxy*.safetensors "
               "to benchmarks/proxy/")


def trainer():
    """benchmarks/proxy/train_detail_proxy.py as a module (to_latent / to_image / sample)."""
    import train_detail_proxy

    return train_detail_proxy


def scenes():
    import detail_scenes

    return detail_scenes


def weights_path() -> Path:
    return Path(os.environ.get("ELASTIC_TOKENS_DETAIL_WEIGHTS") or WEIGHTS)


def grammar_of(weights: Path | None = None) -> str:
    """The scene grammar (detail_scenes) the weights were trained on: their metadata ``grammar``;
    ``free`` for files from before the option, and when there is no file (random weights)."""
    weights = Path(weights) if weights else weights_path()
    if not weights.is_file():
        return "free"
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return scenes().check_grammar((f.metadata() or {}).get("grammar", "free"))


class DetailProxyProvider(ip.ImageProxyProvider):
    """bench_quality ModelProvider for the detail proxy (see module docstring)."""

    name = "detail-proxy"
    steps = 28
    default_real = f"{__file__}:make_real"
    latent_shape = (16, 64, 64)

    def __init__(self, args=None, weights=None, dtype=None, identity_latent: bool = False):
        ip.ProxyProvider.__init__(self, Path(weights) if weights else weights_path(), TEXT_FILE, dtype,
                                  identity_latent, HOW_TO_MAKE)

    def decode(self, latents):
        """``(B, 3, 256, 256)`` float in [0, 1]: the trainer's ``to_image`` of the raw latent."""
        x = trainer().to_image(self.raw_latent(latents))
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0).repeat(1, 3, 1, 1)

    def describe(self) -> dict:
        m = self.meta or {}
        return {"name": self.name, "weights": str(self.weights), "config": getattr(self, "config", None),
                "dtype": str(getattr(self, "dtype", None)), "train_steps": m.get("steps"),
                "train_loss": m.get("loss"), "version": m.get("version"), "data_recipe": m.get("data_recipe"),
                "grammar": m.get("grammar", "free"), "t_shift": m.get("t_shift", "0.0"),
                "image_size": [256, 256], "latent": "16x64x64 raw pixel_unshuffle(4) (EmptySD3LatentImage 512x512), "
                                                   "1024 image tokens",
                "conditioning": "class = seed % 10 (texture family x layout) via 4 learned text tokens, pooled = "
                                "mean, guidance 1.0; negative = empty class",
                "decoder": "latent_format.process_in (undoes process_latent_out) + pixel_shuffle(4)"}


class DetailRandomProvider(DetailProxyProvider):
    """The detail proxy's architecture with random weights (module docstring)."""

    name = "detail-proxy-random"

    def __init__(self, args=None, config: dict | None = None, seed: int | None = None, dtype=None):
        self.weights = weights_path()
        self.text_file = self.weights.with_name(TEXT_FILE)
        self.dtype_name = dtype or os.environ.get("ELASTIC_TOKENS_PROXY_DTYPE") or None
        self.identity_latent = False
        self._model = None
        self._tokens = None
        self.meta = {}
        self.class_names = None
        self.seed = int(os.environ.get("ELASTIC_TOKENS_RANDOM_SEED", 0)) if seed is None else seed
        if config is None and self.weights.is_file():
            from safetensors import safe_open

            with safe_open(str(self.weights), framework="pt") as f:
                config = json.loads(f.metadata()["config"])
        self.config = dict(config) if config is not None else trainer().default_config()

    def random_state(self):
        """(state dict under the files' names, class tokens [11, 4, ctx]) drawn from ``self.seed``."""
        import torch

        tip = trainer().image_trainer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = tip.build_model(self.config, "cpu")
            with torch.no_grad():
                for m in (model.final_layer.linear, model.final_layer.adaLN_modulation[-1]):
                    m.weight.normal_(0.0, 0.02)
            tokens = torch.randn(11, 4, self.config["context_in_dim"])
        return tip.file_names(dict(model.state_dict())), tokens

    def load(self):
        sd, tokens = self.random_state()
        self.patcher_from_state_dict(sd, self.config)
        self._tokens = tokens
        self.class_names = trainer().CLASS_NAMES + ["<empty>"]
        self.meta = {"version": f"random weights, seed {self.seed}"}
        return self._model

    def describe(self) -> dict:
        return {**super().describe(), "weights": f"random (seed {self.seed}; trainer's init, final layer random too)"}


def make_provider(args=None, **kwargs) -> DetailProxyProvider:
    return DetailProxyProvider(args, **kwargs)


def make_random_provider(args=None, **kwargs) -> DetailRandomProvider:
    return DetailRandomProvider(args, **kwargs)


# -------------------------------------------------------------------------- real images

class DetailScenesReal:
    """Held-out reference scenes 0..n-1 (module docstring); uint8 (N, 256, 256, 3)."""

    name = "detail-scenes-heldout"

    def __init__(self, args=None, device: str | None = None):
        want = device or getattr(args, "device", None)
        import torch

        self.device = "cuda" if want == "cuda" and torch.cuda.is_available() else "cpu"
        self.grammar = grammar_of()  # the grammar of the weights the benchmark samples

    def images(self, n: int, hw=(256, 256), return_labels: bool = False):
        import torch

        ds = scenes()
        seeds = ds.reference_seeds(n)
        out = []
        for i in range(0, n, 64):
            img, _ = ds.render(seeds[i:i + 64].to(self.device), grammar=self.grammar)
            u8 = ((img[:, 0] + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
            out.append(np.repeat(u8[..., None], 3, axis=-1))
        arr = np.concatenate(out) if out else np.zeros((0, ds.SIZE, ds.SIZE, 3), np.uint8)
        if tuple(hw) != arr.shape[1:3]:
            import bench_quality

            arr = np.stack([bench_quality._resize_uint8(a, tuple(hw)) for a in arr])
        labels = ds.class_of(seeds).numpy()
        return (arr, labels) if return_labels else arr

    def describe(self) -> dict:
        ds = scenes()
        return {"name": self.name, "render_device": self.device, "grammar": self.grammar,
                "recipe": f"detail_scenes reference stream: scene i = seed {ds.REF_SEED_BASE} + i (class i % 10), "
                          f"never drawn in training (training seeds [0, {ds.TRAIN_SEEDS})); 256x256 uint8 gray as RGB"}


def make_real(args=None, **kwargs) -> DetailScenesReal:
    return DetailScenesReal(args, **kwargs)


# -------------------------------------------------------------------------- check against the trainer

def compare_with_trainer(provider: DetailProxyProvider, labels, steps: int = 8, seed: int = 0,
                         cfg: float = 3.0) -> dict:
    """Same noise and classes through (a) the trainer's own Euler sampler (``train_detail_proxy.sample``
    on the same Flux module) and (b) ComfyUI's ``comfy.sample.sample`` (KSampler's path) with the
    provider's conditioning; max abs differences of the raw latent, with and without undoing
    ``process_latent_out``."""
    import comfy.sample
    import torch

    t = trainer()
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    mp = provider._model
    flux = mp.model.diffusion_model
    dev = next(flux.parameters()).device
    noise = torch.randn(len(labels), *provider.latent_shape, generator=torch.Generator().manual_seed(seed))
    fwd = t.image_trainer().load_flux_forward()
    with torch.no_grad():
        ref = t.sample(fwd, flux, provider.class_tokens.to(dev, torch.float32), labels.to(dev), None, dev,
                       steps=steps, cfg_scale=cfg, noise=noise).float().cpu()
    pos, neg = provider.cond_for(labels.tolist()), provider.cond_for([EMPTY])
    with torch.inference_mode():
        out = comfy.sample.sample(mp, noise, steps, cfg, "euler", "simple", pos, neg,
                                  provider.empty_latent(len(labels)), disable_pbar=True, seed=seed)
    raw = provider.raw_latent(out)
    return {"ref_raw": ref, "comfy_raw": raw, "max_abs_raw": float((raw - ref).abs().max()),
            "max_abs_raw_without_inverse": float((out.float().cpu() - ref).abs().max()),
            "ref_img": t.to_image(ref), "comfy_img": t.to_image(raw)}
