"""The trained video proxy (benchmarks/proxy/train_video_proxy.py) as a ``bench/bench_quality.py``
model provider, and clips built from the Fashion-MNIST test split as its real set.

    python bench/bench_quality.py --model benchmarks/proxy/video_provider.py:make_provider \\
        --real benchmarks/proxy/video_provider.py:make_real --n 8 --steps 10

Model (:func:`make_provider`)
-----------------------------
``video_proxy.safetensors`` (fp16 WanModel weights, ComfyUI key names) is loaded exactly as
UNETLoader loads a Wan 2.1 file: ``comfy.sd.load_diffusion_model_state_dict`` with ComfyUI's own
detection, NO override (dim 256 -> num_heads 2 = dim // 128, ffn_dim / num_layers / in_dim from the
weights, text_dim = Wan's default 4096) -> ``WAN21_T2V`` (stock ``Wan21`` latent format,
``ModelSamplingDiscreteFlow`` + ``CONST``, multiplier 1000). :meth:`VideoProxyProvider.load` checks
the detected config against the file's metadata ``config``. Weights: float32 on CPU, bfloat16 on
CUDA (the trainer's autocast dtype); ``ELASTIC_TOKENS_PROXY_DTYPE`` = fp32/bf16/fp16 overrides.
Then ComfyUI's ``ModelSamplingSD3`` node (``comfy_extras.nodes_model_advanced``) sets the shift to
the file's ``sampling_shift`` (3.0; the stock Wan 2.1 shift 8.0 is meant for ~32k-token videos,
see the trainer's docstring), as a Wan workflow's ModelSamplingSD3 node does; ``shift=`` overrides
(``shift=None`` keeps the stock 8.0).

Sampling settings: 30 steps, euler / simple, cfg 3.0 (the trainer's sample grid). Sample ``seed``
gets class ``seed % 10``: positive = ``[[class_tokens[c] (1, 4, 4096), {}]]`` stacked over the
batch; negative = the empty class 10 (batch 1, ComfyUI broadcasts it). The latent is
``(16, 9, 16, 16)`` (what ``EmptyHunyuanLatentVideo`` gives for 128x128, length 33), the video 9
frames of 64x64 (no temporal compression: one latent frame per video frame).

Latent format (checked against ComfyUI 0.3.75, comfy/samplers.py ``CFGGuider.inner_sample``,
comfy/model_sampling.py ``CONST``, comfy/latent_formats.py ``Wan21``): the sampler applies
``process_latent_in`` only to a NON-empty input latent (``count_nonzero > 0``); an empty latent
stays zero and ``noise_scaling`` gives ``sigma_max * noise + (1 - sigma_max) * 0 = noise``
(``sigma_max`` of ModelSamplingDiscreteFlow is ``shift(1000 / 1000)`` = exactly 1.0 for any shift).
So for text-to-video the model sees exactly what the trainer fed it (raw unshuffled pixels + noise,
x_1 = eps; model timestep = 1000 sigma as in training). Only the OUTPUT passes
``process_latent_out`` = ``x * latents_std + latents_mean`` (16 per-channel constants of Wan's VAE,
shape (1, 16, 1, 1, 1)); :meth:`VideoProxyProvider.raw_latent` undoes it with the model's own
``process_in`` (``(x - latents_mean) / latents_std``) before ``pixel_shuffle(4)`` per frame, so
``decode_frames(out)`` is the trainer's ``to_frames`` of its own sampler's result (float32 rounding
only). :func:`identity_latent_format` (``identity_latent=True``) is for video-to-video use with a
non-empty input latent (there ``process_in`` WOULD normalise the raw latent by Wan's statistics).

The KSampler path against the trainer's own Euler sampler (``train_video_proxy.sample``, same noise
and classes, sigmas of ``wan_sigmas`` = ComfyUI's "simple" schedule bit for bit):
:func:`compare_with_trainer` (``python benchmarks/proxy/video_provider.py``);
tests/test_video_proxy_training.py checks it on a tiny random model.

Images for bench_quality
------------------------
bench_quality (as of this commit) expects ``decode`` -> ``(B, 3, H, W)`` and real images
``(N, H, W, 3)``, one image per seed. So :meth:`decode` returns each clip as a 3x3 MOSAIC of its 9
frames (frame i at row i // 3, column i % 3; 192x192, gray as RGB) and :class:`FashionMNISTTestClips`
returns real clips in the same mosaic: FID/KID then compare clip mosaics (content and, weakly,
motion consistency), LPIPS/PSNR/SSIM compare whole clips against the baseline's. Per-frame metrics
need :meth:`decode_frames` ``(B, 9, 3, 64, 64)``; see NOTES_FOR_BENCH_QUALITY below.

Real clips (:func:`make_real`)
------------------------------
The Fashion-MNIST TEST split (t10k, never trained on) through the trainer's own ``make_clips``
(same motion recipe) on CPU with a fixed generator (seed 12345), class-balanced in the generated
order: clip ``i`` shows the ``i // 10``-th test image of class ``i % 10``, matching the class mix
of seeds ``0..n-1``. Quantised to uint8.

Paths: ``ELASTIC_TOKENS_VIDEO_PROXY_WEIGHTS`` (default benchmarks/proxy/video_proxy.safetensors;
the text file ``video_proxy_text.safetensors`` beside it) and ``ELASTIC_TOKENS_PROXY_DATA``
(default .proxy_data/, then /usr/share/datasets/fashion-mnist).
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

WEIGHTS = HERE / "video_proxy.safetensors"
TEXT_FILE = "video_proxy_text.safetensors"
EMPTY = 10
NUM_CLASSES = 10
REAL_SEED = 12345
MOSAIC = (3, 3)

NOTES_FOR_BENCH_QUALITY = """\
What bench/bench_quality.py would need for per-frame video metrics (not changed here):
1. decode: accept (B, F, 3, H, W) from a provider flag (e.g. provider.video = True, use
   provider.decode_frames); qm.as_uint8_images and samples.png assume 4-d NCHW/NHWC.
2. FID/KID: flatten frames, B*F generated frames against the real provider's frames
   (make_real(...).frames(n) -> (n, F, H, W, 3)); the real set needs n*F frames, not n images.
   (No FVD: its I3D weights cannot be downloaded here.)
3. LPIPS/PSNR/SSIM vs the baseline: per frame, averaged per clip, so the bootstrap still resamples
   over seeds (clips), not frames; optionally a temporal term (e.g. PSNR of frame differences).
4. samples.png: one row per setting showing F frames of the first seed (or the first frame only).
5. Everything else is already dimension-agnostic: empty_latent 5-d passes through
   comfy.sample.fix_empty_latent_channels, prepare_noise(latent[:1], seed) draws the 5-d noise
   KSampler draws, and the node's reports/FLOP counts are per token.
Until then decode() returns a 3x3 mosaic of the 9 frames (192x192) and make_real the same mosaic,
which bench_quality handles unchanged (checked on CPU: --n 4 --steps 4 --settings 2x on a briefly
trained model ran every row, the node's 2x schedule included, through to bench_quality.md)."""


def trainer():
    """benchmarks/proxy/train_video_proxy.py as a module (its make_clips / to_latent / to_frames / sample)."""
    import train_video_proxy  # benchmarks/proxy is on sys.path (see the top of this file)

    return train_video_proxy


def weights_path() -> Path:
    return Path(os.environ.get("ELASTIC_TOKENS_VIDEO_PROXY_WEIGHTS") or WEIGHTS)


def data_dir() -> Path:
    """The Fashion-MNIST folder, as for the image proxy (image_provider.data_dir)."""
    return image_provider().data_dir()


def identity_latent_format():
    """A Wan21 latent format with mean 0 / std 1 (process_in = process_out = identity)."""
    import comfy.latent_formats
    import torch

    class ProxyRawVideoLatent(comfy.latent_formats.Wan21):
        def __init__(self):
            super().__init__()
            self.latents_mean = torch.zeros_like(self.latents_mean)
            self.latents_std = torch.ones_like(self.latents_std)

    return ProxyRawVideoLatent


def mosaic(frames, grid=MOSAIC):
    """(B, F, C, H, W) -> (B, C, rows*H, cols*W); frame i at row i // cols, column i % cols."""
    B, Fr, C, H, W = frames.shape
    rows, cols = grid
    if rows * cols != Fr:
        raise ValueError(f"{Fr} frames do not fill a {rows}x{cols} mosaic")
    return frames.reshape(B, rows, cols, C, H, W).permute(0, 3, 1, 4, 2, 5).reshape(B, C, rows * H, cols * W)


def image_provider():
    """benchmarks/proxy/image_provider.py as a module (its ProxyProvider base class)."""
    import image_provider  # benchmarks/proxy is on sys.path (see the top of this file)

    return image_provider


class VideoProxyProvider(image_provider().ProxyProvider):
    """bench_quality ModelProvider for the video proxy (see module docstring)."""

    name = "video-proxy"
    steps = 30
    default_real = f"{__file__}:make_real"
    latent_shape = (16, 9, 16, 16)

    _DEFAULT = object()

    def __init__(self, args=None, weights=None, dtype=None, identity_latent: bool = False, shift=_DEFAULT):
        super().__init__(Path(weights) if weights else weights_path(), TEXT_FILE, dtype, identity_latent,
                         "train_video_proxy.py --export DIR writes it; --merge DIR joins shards")
        self.shift_arg = shift

    # ------------------------------------------------------------------ bench_quality interface
    def load(self):
        import comfy.model_management as mm
        import comfy.sd
        import comfy.utils

        sd, meta = comfy.utils.load_torch_file(str(self.weights), return_metadata=True)
        self.meta = meta or {}
        self.config = json.loads(self.meta["config"])
        dtype = self._torch_dtype(mm.get_torch_device())
        mp = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype}, metadata=self.meta)
        if mp is None:
            raise RuntimeError(f"ComfyUI did not detect {self.weights} as a diffusion model")
        self.check_detected(mp)
        if self.identity_latent:
            mp.add_object_patch("latent_format", identity_latent_format()())
        self.shift = float(self.meta.get("sampling_shift", 3.0)) if self.shift_arg is self._DEFAULT else self.shift_arg
        if self.shift is not None:
            from comfy_extras.nodes_model_advanced import ModelSamplingSD3

            mp = ModelSamplingSD3().patch(mp, self.shift)[0]
        self.dtype = dtype
        self._model = mp
        self._load_tokens()
        return self._model

    def check_detected(self, mp) -> None:
        """The detected WanModel matches the trainer's config (ComfyUI's own detection, no override)."""
        import comfy.ldm.wan.model

        dm = mp.model.diffusion_model
        if type(dm) is not comfy.ldm.wan.model.WanModel or type(mp.model.model_config).__name__ != "WAN21_T2V":
            raise RuntimeError(f"{self.weights}: detected {type(mp.model.model_config).__name__} / {type(dm).__name__}")
        got = {k: getattr(dm, k) for k in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim",
                                           "text_dim", "freq_dim", "model_type")}
        got["patch_size"] = list(dm.patch_size)
        want = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.config.items() if k in got}
        if got != want:
            raise RuntimeError(f"{self.weights}: ComfyUI detected {got}, the trainer wrote {want}")

    def cond_for(self, labels):
        """CONDITIONING for a list of class indices (one entry, batch = len(labels))."""
        import torch

        return [[self.class_tokens[torch.as_tensor(list(labels), dtype=torch.long)], {}]]

    def decode_frames(self, latents):
        """``(B, 9, 3, 64, 64)`` float in [0, 1]: the trainer's ``to_frames`` of the raw latent."""
        x = trainer().to_frames(self.raw_latent(latents))  # (B, F, 1, 64, 64) in [-1, 1]
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0).repeat(1, 1, 3, 1, 1)

    def decode(self, latents):
        """``(B, 3, 192, 192)`` float in [0, 1]: the 9 frames as a 3x3 mosaic (bench_quality is 4-d)."""
        return mosaic(self.decode_frames(latents))

    def describe(self) -> dict:
        m = self.meta or {}
        return {"name": self.name, "weights": str(self.weights), "config": getattr(self, "config", None),
                "dtype": str(getattr(self, "dtype", None)), "train_steps": m.get("steps"),
                "train_loss": m.get("loss"), "version": m.get("version"), "data_recipe": m.get("data_recipe"),
                "sampling_shift": getattr(self, "shift", None),
                "video": "9 frames 64x64 gray; images are 3x3 frame mosaics 192x192",
                "latent": "16x9x16x16 raw pixel_unshuffle(4) per frame (EmptyHunyuanLatentVideo 128x128, length 33)",
                "conditioning": "class = seed % 10 via 4 learned text tokens (4096); negative = empty class",
                "decoder": ("latent_format.process_in (undoes process_latent_out) + pixel_shuffle(4) per frame; "
                            f"latent format {'identity' if self.identity_latent else 'ComfyUI Wan21 (mean/std)'}")}


def make_provider(args=None, **kwargs) -> VideoProxyProvider:
    return VideoProxyProvider(args, **kwargs)


# -------------------------------------------------------------------------- real clips

def balanced_order(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices: position i holds the (i // 10)-th example of class i % 10."""
    per = [np.flatnonzero(labels == c) for c in range(NUM_CLASSES)]
    need = -(-n // NUM_CLASSES)
    if min(len(p) for p in per) < need:
        raise ValueError(f"n={n}: not enough test images per class")
    return np.stack([p[:need] for p in per], axis=1).reshape(-1)[:n]


class FashionMNISTTestClips:
    """Held-out Fashion-MNIST (t10k) clips by the trainer's recipe; mosaics uint8 (N, 192, 192, 3)."""

    name = "fashion-mnist-test-clips"

    def __init__(self, args=None, data=None, seed: int = REAL_SEED):
        self.dir = Path(data) if data else data_dir()
        self.seed = seed

    def load_split(self):
        t = trainer().image_trainer()
        imgs = t.read_idx(self.dir / "t10k-images-idx3-ubyte.gz")
        labels = t.read_idx(self.dir / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
        return imgs, labels

    def frames(self, n: int, return_labels: bool = False):
        """uint8 ``(n, 9, 64, 64)`` clips (class-balanced order), built on CPU with one generator."""
        import torch

        imgs, labels = self.load_split()
        if n > len(imgs):
            raise SystemExit(f"--real {self.name}: {len(imgs)} test images, need {n}")
        idx = balanced_order(labels, n)
        gen = torch.Generator().manual_seed(self.seed)
        out = []
        for i in range(0, n, 500):
            clip = trainer().make_clips(torch.from_numpy(imgs[idx[i:i + 500]].copy()), gen)  # [-1, 1]
            out.append(((clip + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())
        arr = np.concatenate(out) if out else np.zeros((0, 9, 64, 64), np.uint8)
        return (arr, labels[idx]) if return_labels else arr

    def images(self, n: int, hw=(192, 192), return_labels: bool = False):
        import torch

        clips, labels = self.frames(n, return_labels=True)
        m = mosaic(torch.from_numpy(clips)[:, :, None]).numpy()[:, 0]  # (n, 192, 192)
        arr = np.repeat(m[..., None], 3, axis=-1)
        if tuple(hw) != arr.shape[1:3]:
            import bench_quality

            arr = np.stack([bench_quality._resize_uint8(a, tuple(hw)) for a in arr])
        return (arr, labels) if return_labels else arr

    def describe(self) -> dict:
        return {"name": self.name, "path": str(self.dir), "seed": self.seed,
                "recipe": "Fashion-MNIST t10k (never trained on) -> train_video_proxy.make_clips (pan/zoom/move, "
                          "9 frames 64x64) on CPU, generator seed %d; uint8 gray as RGB, 3x3 frame mosaic; "
                          "class-balanced: clip i = class i %% 10" % self.seed}


def make_real(args=None, **kwargs) -> FashionMNISTTestClips:
    return FashionMNISTTestClips(args, **kwargs)


# -------------------------------------------------------------------------- check against the trainer

def compare_with_trainer(provider: VideoProxyProvider, labels, steps: int = 8, seed: int = 0,
                         cfg: float = 3.0) -> dict:
    """Same noise and classes through (a) the trainer's own ``sample`` (its Euler loop, its
    ``wan_sigmas`` at the provider's shift, ``wan_forward`` on the same WanModel) and (b) ComfyUI's
    ``comfy.sample.sample`` (KSampler's path) with the provider's conditioning and empty latent.
    Returns the raw latents and max abs differences (raw latent, [-1, 1] frames, sigmas)."""
    import comfy.sample
    import comfy.samplers
    import torch

    t = trainer()
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    mp = provider._model
    wan = mp.model.diffusion_model
    dev = next(wan.parameters()).device
    fwd = t.load_wan_forward()
    tokens = provider.class_tokens.to(dev, torch.float32)
    noise = torch.randn(len(labels), *provider.latent_shape, generator=torch.Generator().manual_seed(seed))
    shift = provider.shift if provider.shift is not None else 8.0
    with torch.no_grad():
        ref = t.sample(fwd, wan, tokens, labels.to(dev), None, dev, steps=steps, cfg_scale=cfg, shift=shift,
                       noise=noise).float().cpu()
    pos, neg = provider.cond_for(labels.tolist()), provider.cond_for([EMPTY])
    latent = comfy.sample.fix_empty_latent_channels(mp, provider.empty_latent(len(labels)))
    with torch.inference_mode():
        out = comfy.sample.sample(mp, noise, steps, cfg, "euler", "simple", pos, neg, latent,
                                  disable_pbar=True, seed=seed)
    raw = provider.raw_latent(out)
    ms = mp.get_model_object("model_sampling")
    comfy_sigmas = comfy.samplers.calculate_sigmas(ms, "simple", steps).float().cpu()
    return {"ref_raw": ref, "comfy_raw": raw, "comfy_out": out,
            "max_abs_raw": float((raw - ref).abs().max()),
            "max_abs_frames": float((t.to_frames(raw).clamp(-1, 1) - t.to_frames(ref).clamp(-1, 1)).abs().max()),
            "max_abs_sigmas": float((comfy_sigmas - t.wan_sigmas(steps, shift)).abs().max()),
            "max_abs_raw_without_inverse": float((out.float().cpu() - ref).abs().max())}


if __name__ == "__main__":  # quick report: KSampler vs the trainer's sampler
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, nargs="+", default=[8, 30])
    ap.add_argument("--n", type=int, default=4)
    a = ap.parse_args()
    p = make_provider()
    p.setup("cpu")
    p.load()
    for s in a.steps:
        r = compare_with_trainer(p, [i % 10 for i in range(a.n)], steps=s)
        print(f"steps={s}: max|raw diff|={r['max_abs_raw']:.3e} max|frame diff|={r['max_abs_frames']:.3e} "
              f"max|sigma diff|={r['max_abs_sigmas']:.3e} (without the inverse: {r['max_abs_raw_without_inverse']:.3f})")
