"""The trained image proxy (benchmarks/proxy/train_image_proxy.py) as a ``bench/bench_quality.py``
model provider, and the Fashion-MNIST test split as its real-image set.

    python bench/bench_quality.py --model benchmarks/proxy/image_provider.py:make_provider \\
        --real benchmarks/proxy/image_provider.py:make_real --n 8 --steps 8

Model (:func:`make_provider`)
-----------------------------
``image_proxy.safetensors`` (fp16 Flux weights, ComfyUI key names; the Flux kwargs in its metadata
``config``) becomes a ComfyUI ModelPatcher the way ``comfy.sd.load_diffusion_model_state_dict``
builds one, except for the detection step (ComfyUI's Flux detection hard-codes 24 heads):
``comfy.supported_models.Flux({"image_model": "flux", **config})`` -> ``set_inference_dtype`` ->
``get_model`` -> ``diffusion_model.load_state_dict(strict=True)`` -> ``ModelPatcher``. So the model
carries ComfyUI's stock FLUX ``latent_format`` and ``ModelSamplingFlux`` (shift 1.15), as a
UNETLoader-loaded FLUX.1-dev would. Weights: float32 on CPU, bfloat16 on CUDA (the trainer's
autocast dtype); ``ELASTIC_TOKENS_PROXY_DTYPE`` = fp32/bf16/fp16 overrides.

Sampling settings: 28 steps, euler / simple, cfg 3.0 (the trainer's sample grid). Sample ``seed``
gets class ``seed % 10``: positive = ``[[class_tokens[c] (1, 4, 256), {"pooled_output": mean of the
4 tokens, "guidance": 1.0}]]`` stacked over the batch; negative = the same for the empty class 10
(batch 1, ComfyUI broadcasts it). The latent is 16x32x32 (what ``EmptySD3LatentImage`` gives for
256x256), images are 128x128 (grayscale repeated to RGB).

Latent format (checked against ComfyUI 0.3.75, comfy/samplers.py ``CFGGuider.inner_sample`` and
comfy/model_sampling.py ``CONST``): the sampler applies ``process_latent_in`` only to a NON-empty
input latent (``count_nonzero > 0``); an empty latent is left at zero, and the flow model's
``noise_scaling`` gives ``sigma_max * noise + (1 - sigma_max) * 0 = noise`` (``sigma_max`` of
ModelSamplingFlux is exactly 1.0). So for text-to-image the model sees exactly what the trainer
fed it (raw unshuffled pixels + noise, x_1 = eps): the FLUX scale/shift never reaches the model
input. Only the OUTPUT passes ``process_latent_out`` (``x / 0.3611 + 0.1159``);
:meth:`ImageProxyProvider.decode` undoes it with the model's own ``process_in``
(``(x - 0.1159) * 0.3611``) before ``pixel_shuffle(4)``, so ``decode(out)`` is the trainer's
``to_image`` of its own sampler's result (float32 rounding only). No custom latent format is
needed; :func:`identity_latent_format` exists for img2img-style use with a non-empty input latent
(there ``process_in`` WOULD scale the raw latent by 0.3611), set it with ``identity_latent=True``.

The KSampler path against the trainer's own Euler sampler (``train_image_proxy.sample``, same
noise and classes): :func:`compare_with_trainer` (``python benchmarks/proxy/image_provider.py``);
tests/test_image_proxy_provider.py checks it. Measured on CPU, fp32, 4 samples: 8 steps max |diff|
of the raw latent (= [-1, 1] pixels) 1.1e-5 (sigmas equal to 6e-8: ComfyUI's "simple" schedule
reads ModelSamplingFlux's 10000-entry table at ``int(i * 10000 / N)``, exact when N divides
10000); 28 steps 3.9e-3 (the table index truncation moves sigmas by up to 2.3e-4). Without the
``process_in`` inverse the difference is ~2.

Real images (:func:`make_real`)
-------------------------------
The Fashion-MNIST TEST split (t10k, 10k images never seen in training), upsampled exactly as the
trainer does (``[-1, 1]`` -> bilinear 128x128, ``to_image(to_latent(x))``) and quantised to uint8
RGB. Class-balanced in the generated order: image ``i`` is the ``i // 10``-th test image of class
``i % 10`` (n <= 10000), matching the generated class mix of seeds ``0..n-1``.

Paths: ``ELASTIC_TOKENS_PROXY_WEIGHTS`` (default benchmarks/proxy/image_proxy.safetensors; the text
file is ``image_proxy_text.safetensors`` beside it) and ``ELASTIC_TOKENS_PROXY_DATA`` (default
.proxy_data/, then /usr/share/datasets/fashion-mnist).
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

WEIGHTS = HERE / "image_proxy.safetensors"
TEXT_FILE = "image_proxy_text.safetensors"
EMPTY = 10
NUM_CLASSES = 10
DATA_DIRS = (REPO / ".proxy_data", Path("/usr/share/datasets/fashion-mnist"))


def trainer():
    """benchmarks/proxy/train_image_proxy.py as a module (its to_latent / to_image / sample)."""
    import train_image_proxy  # benchmarks/proxy is on sys.path (see the top of this file)

    return train_image_proxy


def weights_path() -> Path:
    return Path(os.environ.get("ELASTIC_TOKENS_PROXY_WEIGHTS") or WEIGHTS)


def data_dir() -> Path:
    env = os.environ.get("ELASTIC_TOKENS_PROXY_DATA")
    cands = [Path(env)] if env else list(DATA_DIRS)
    for d in cands:
        if (d / "t10k-images-idx3-ubyte.gz").is_file():
            return d
    raise FileNotFoundError(f"no Fashion-MNIST idx files in {[str(c) for c in cands]} "
                            "(run scripts/proxy_data.sh or set ELASTIC_TOKENS_PROXY_DATA)")


def identity_latent_format():
    """A FLUX latent format with scale 1 / shift 0 (process_in = process_out = identity)."""
    import comfy.latent_formats

    class ProxyRawLatent(comfy.latent_formats.Flux):
        def __init__(self):
            super().__init__()
            self.scale_factor = 1.0
            self.shift_factor = 0.0

    return ProxyRawLatent


class ProxyProvider:
    """What the image and video proxy providers share: bench_quality setup, weight dtype, the
    class-token table, class = seed % 10 conditioning against the empty class, and undoing the
    latent format's ``process_latent_out``. Subclasses load their model, build ``cond_for`` and decode."""

    sampler = "euler"
    scheduler = "simple"
    cfg = 3.0
    devices = ("cpu", "cuda")
    latent_shape: tuple = ()
    _model = None
    _tokens = None

    def __init__(self, weights: Path, text_name: str, dtype, identity_latent: bool, how_to_make: str):
        self.weights = weights
        if not self.weights.is_file():
            raise FileNotFoundError(f"{self.weights} is missing ({how_to_make})")
        self.text_file = self.weights.with_name(text_name)
        self.dtype_name = dtype or os.environ.get("ELASTIC_TOKENS_PROXY_DTYPE") or None
        self.identity_latent = identity_latent
        self._model = None
        self._tokens = None
        self.meta = None
        self.class_names = None

    # ------------------------------------------------------------------ bench_quality interface
    def setup(self, device: str) -> None:
        """bench_quality's own setup (CPU: the tests' bootstrap; CUDA: bench_speed's, --highvram)."""
        main = sys.modules.get("__main__")
        setup = getattr(main, "setup_comfy", None)  # bench_quality run as a script: no second import
        if setup is None:
            import bench_quality

            setup = bench_quality.setup_comfy
        setup(device)

    def _torch_dtype(self, load_device):
        import torch

        names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
        if self.dtype_name:
            return names[self.dtype_name]
        return torch.bfloat16 if load_device.type == "cuda" else torch.float32

    def _load_tokens(self):
        import comfy.utils

        sd, meta = comfy.utils.load_torch_file(str(self.text_file), return_metadata=True)
        self._tokens = sd["class_tokens"].float()  # (11, 4, ctx)
        self.class_names = json.loads((meta or {}).get("class_names", "[]"))

    @property
    def class_tokens(self):
        if self._tokens is None:
            self._load_tokens()
        return self._tokens

    def empty_latent(self, batch: int):
        import torch

        return torch.zeros((batch, *self.latent_shape))

    @staticmethod
    def class_of(seed: int) -> int:
        return int(seed) % NUM_CLASSES

    def conditioning(self, seeds):
        return self.cond_for([self.class_of(s) for s in seeds]), self.cond_for([EMPTY])

    def raw_latent(self, latents):
        """The sampler's output (after ``process_latent_out``) -> the trainer's raw latent."""
        fmt = self._model.get_model_object("latent_format")
        return fmt.process_in(latents.float().cpu())


class ImageProxyProvider(ProxyProvider):
    """bench_quality ModelProvider for the image proxy (see module docstring)."""

    name = "image-proxy"
    steps = 28
    default_real = f"{__file__}:make_real"
    latent_shape = (16, 32, 32)

    def __init__(self, args=None, weights=None, dtype=None, identity_latent: bool = False):
        super().__init__(Path(weights) if weights else weights_path(), TEXT_FILE, dtype, identity_latent,
                         "train_image_proxy.py --merge DIR writes it")

    # ------------------------------------------------------------------ bench_quality interface
    def load(self):
        import comfy.utils

        sd, meta = comfy.utils.load_torch_file(str(self.weights), return_metadata=True)
        self.meta = meta or {}
        self.patcher_from_state_dict(sd, json.loads(self.meta["config"]))
        self._load_tokens()
        return self._model

    def patcher_from_state_dict(self, sd: dict, config: dict):
        """``self._model``: a ModelPatcher of ComfyUI's Flux with ``config`` (the trainer's Flux kwargs)
        and the state dict ``sd`` (file names, fp16 or float32), loaded strictly (module docstring)."""
        import comfy.model_management as mm
        import comfy.model_patcher
        import comfy.supported_models

        t = trainer()
        model_config = comfy.supported_models.Flux({"image_model": "flux", **t.comfy_flux_kwargs(config)})
        if self.identity_latent:
            model_config.latent_format = identity_latent_format()
        load_device = mm.get_torch_device()
        offload_device = mm.unet_offload_device()
        dtype = self._torch_dtype(load_device)
        manual_cast = mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
        model_config.set_inference_dtype(dtype, manual_cast)
        model = model_config.get_model(sd, "", device=offload_device)
        model.diffusion_model.load_state_dict(t.model_names(sd, model.diffusion_model), strict=True)  # casts fp16 -> dtype
        model = model.to(offload_device)
        self.dtype = dtype
        self.config = config
        self._model = comfy.model_patcher.ModelPatcher(model, load_device=load_device,
                                                       offload_device=offload_device)
        return self._model

    def cond_for(self, labels):
        """CONDITIONING for a list of class indices (one entry, batch = len(labels))."""
        import torch

        ctx = self.class_tokens[torch.as_tensor(list(labels), dtype=torch.long)]
        return [[ctx, {"pooled_output": ctx.mean(1), "guidance": 1.0}]]

    def decode(self, latents):
        """``(B, 3, 128, 128)`` float in [0, 1]: the trainer's ``to_image`` of the raw latent."""
        x = trainer().to_image(self.raw_latent(latents))  # (B, 1, 128, 128) in [-1, 1]
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0).repeat(1, 3, 1, 1)

    def describe(self) -> dict:
        m = self.meta or {}
        return {"name": self.name, "weights": str(self.weights), "config": getattr(self, "config", None),
                "dtype": str(getattr(self, "dtype", None)), "train_steps": m.get("steps"),
                "train_loss": m.get("loss"), "version": m.get("version"), "data_recipe": m.get("data_recipe"),
                "image_size": [128, 128], "latent": "16x32x32 raw pixel_unshuffle(4) (EmptySD3LatentImage 256x256)",
                "conditioning": "class = seed % 10 via 4 learned text tokens, pooled = mean, guidance 1.0; "
                                "negative = empty class",
                "decoder": ("latent_format.process_in (undoes process_latent_out) + pixel_shuffle(4); "
                            f"latent format {'identity' if self.identity_latent else 'ComfyUI FLUX (0.3611/0.1159)'}")}


def make_provider(args=None, **kwargs) -> ImageProxyProvider:
    return ImageProxyProvider(args, **kwargs)


# -------------------------------------------------------------------------- real images

def balanced_order(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices: position i holds the (i // 10)-th example of class i % 10."""
    per = [np.flatnonzero(labels == c) for c in range(NUM_CLASSES)]
    need = -(-n // NUM_CLASSES)
    if min(len(p) for p in per) < need:
        raise ValueError(f"n={n}: not enough test images per class")
    idx = np.stack([p[:need] for p in per], axis=1).reshape(-1)  # row-major: class cycles fastest
    return idx[:n]


class FashionMNISTTestReal:
    """Held-out Fashion-MNIST (t10k), upsampled like the trainer; uint8 (N, 128, 128, 3)."""

    name = "fashion-mnist-test"

    def __init__(self, args=None, data=None):
        self.dir = Path(data) if data else data_dir()

    def load_split(self):
        t = trainer()
        imgs = t.read_idx(self.dir / "t10k-images-idx3-ubyte.gz")
        labels = t.read_idx(self.dir / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
        return imgs, labels

    def images(self, n: int, hw=(128, 128), return_labels: bool = False):
        import torch

        imgs, labels = self.load_split()
        if n > len(imgs):
            raise SystemExit(f"--real {self.name}: {len(imgs)} test images, need {n}")
        idx = balanced_order(labels, n)
        t = trainer()
        out = []
        for i in range(0, n, 500):
            x = t.to_image(t.to_latent(torch.from_numpy(imgs[idx[i:i + 500]].copy())))  # [-1,1] 128x128
            u8 = ((x[:, 0] + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
            out.append(np.repeat(u8[..., None], 3, axis=-1))
        arr = np.concatenate(out) if out else np.zeros((0, 128, 128, 3), np.uint8)
        if tuple(hw) != arr.shape[1:3]:
            import bench_quality

            arr = np.stack([bench_quality._resize_uint8(a, tuple(hw)) for a in arr])
        return (arr, labels[idx]) if return_labels else arr

    def describe(self) -> dict:
        return {"name": self.name, "path": str(self.dir),
                "recipe": "Fashion-MNIST t10k (never trained on), [-1,1] -> bilinear 128x128 (trainer's "
                          "to_image(to_latent)), uint8 gray as RGB; class-balanced: image i = class i % 10"}


def make_real(args=None, **kwargs) -> FashionMNISTTestReal:
    return FashionMNISTTestReal(args, **kwargs)


# -------------------------------------------------------------------------- check against the trainer

def compare_with_trainer(provider: ImageProxyProvider, labels, steps: int = 8, seed: int = 0,
                         cfg: float = 3.0) -> dict:
    """Same noise and classes through (a) the trainer's own ``sample`` (its Euler loop, its
    ``flux_sigmas``, the autograd-safe forward on the same Flux module) and (b) ComfyUI's
    ``comfy.sample.sample`` (KSampler's path) with the provider's conditioning. Returns the raw
    latents, decoded images and max abs differences (raw latent and [-1, 1] pixels)."""
    import comfy.sample
    import comfy.samplers
    import torch

    t = trainer()
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    mp = provider._model
    flux = mp.model.diffusion_model
    dev = next(flux.parameters()).device
    fwd = t.load_flux_forward()
    tokens = provider.class_tokens.to(dev, torch.float32)  # CPU fp32 model: the trainer fwd as trained
    with torch.no_grad():
        ref = t.sample(fwd, flux, tokens, labels.to(dev), torch.Generator(device=dev).manual_seed(seed), dev,
                       steps=steps, cfg_scale=cfg).float().cpu()
    noise = torch.randn(len(labels), *provider.latent_shape, generator=torch.Generator(device=dev).manual_seed(seed),
                        device=dev).cpu()
    pos, neg = provider.cond_for(labels.tolist()), provider.cond_for([EMPTY])
    latent = provider.empty_latent(len(labels))
    with torch.inference_mode():
        out = comfy.sample.sample(mp, noise, steps, cfg, "euler", "simple", pos, neg, latent,
                                  disable_pbar=True, seed=seed)
    raw = provider.raw_latent(out)
    ms = mp.get_model_object("model_sampling")
    comfy_sigmas = comfy.samplers.calculate_sigmas(ms, "simple", steps).float().cpu()
    return {"ref_raw": ref, "comfy_raw": raw, "comfy_out": out,
            "ref_img": t.to_image(ref), "comfy_img": t.to_image(raw),
            "max_abs_raw": float((raw - ref).abs().max()),
            "max_abs_pixels": float((t.to_image(raw).clamp(-1, 1) - t.to_image(ref).clamp(-1, 1)).abs().max()),
            "max_abs_sigmas": float((comfy_sigmas - t.flux_sigmas(steps)).abs().max()),
            "max_abs_raw_without_inverse": float((out.float().cpu() - ref).abs().max())}


if __name__ == "__main__":  # quick report: KSampler vs the trainer's sampler
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, nargs="+", default=[8, 28])
    ap.add_argument("--n", type=int, default=4)
    a = ap.parse_args()
    p = make_provider()
    p.setup("cpu")
    p.load()
    for s in a.steps:
        r = compare_with_trainer(p, [i % 10 for i in range(a.n)], steps=s)
        print(f"steps={s}: max|raw diff|={r['max_abs_raw']:.3e} max|pixel diff|={r['max_abs_pixels']:.3e} "
              f"max|sigma diff|={r['max_abs_sigmas']:.3e} (without the inverse: {r['max_abs_raw_without_inverse']:.3f})")
