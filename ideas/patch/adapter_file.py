"""Patch-size adapters: what DDiT trains so that coarse steps keep the native quality.

For each coarse factor ``k`` (patch ``k*p``) an adapter holds

* an **embed** correction: a linear map from the full-resolution ``k*p`` patch (``C*(k*p)^2``
  features) to the hidden size, added to the tokens the model's own embed makes from the
  PI-resized input. Together they are the coarse embed layer ``W_pi + E``, initialised (``E = 0``)
  to the training-free pseudo-inverse resize (kernels/resize.py);
* a learned **patch-size embedding** added to every image token (it tells the blocks which patch
  size they see);
* a **de-embed** correction from the last block's hidden state to the ``k*p`` output patch, added
  to the upsampled clean estimate (the training-free de-embed), zero-initialised;
* a **residual** from the input patch to the output patch, zero-initialised;
* **LoRA** (rank ``r``, default 32) on the feed-forward layers, active on ``k*p`` steps only.

An untrained adapter therefore reproduces the training-free coarse step exactly; training
(training/distill.py, self-distillation) only moves it away from there.

File format: one ``.safetensors`` (never pickle), tensors ``coarse.{k}.{embed.weight,
size_embedding,deembed.weight,residual.weight}`` and ``lora.{k}.{module}.lora_{A,B}.weight``
(peft's names), metadata ``format``, ``version`` and the JSON fields of :class:`AdapterSpec`
(family, patch sizes, sizes, rank, LoRA targets, a fingerprint of the base weights, training
settings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..learned_file import ADAPTER_FORMAT, check_format, spec_fields, spec_metadata
from ..learned_file import base_fingerprint, fingerprint, fingerprint_problems, read_safetensors  # noqa: F401

FORMAT = ADAPTER_FORMAT
FORMAT_VERSION = 1


class AdapterError(ValueError):
    """An adapter file that cannot be used with this model (message says why and what to do)."""


@dataclass(frozen=True)
class AdapterSpec:
    """Everything about an adapter except its tensors; stored as safetensors metadata."""

    family: str                       # "flux" or "wan"
    native_patch: int                 # spatial patch of the base model
    temporal_patch: int               # 1 for images and Wan 2.1
    latent_channels: int
    hidden_size: int
    factors: tuple[int, ...]          # coarse factors covered, e.g. (2,) or (2, 4)
    rank: int = 32
    alpha: float = 32.0
    lora_targets: tuple[str, ...] = ()    # module names inside the diffusion model
    fingerprint: dict = field(default_factory=dict, compare=False)
    training: dict = field(default_factory=dict, compare=False)

    @classmethod
    def for_model(cls, model_patcher, binding, factors, rank: int = 32, alpha: float | None = None,
                  training: dict | None = None) -> "AdapterSpec":
        """The spec of an adapter for ``model_patcher``: its binding's geometry and feed-forward
        LoRA targets, and the fingerprint of its base weights (alpha defaults to the rank)."""
        return cls(binding.family, binding.native_patch, binding.temporal_patch, binding.latent_channels,
                   binding.hidden_size, tuple(factors), rank, float(rank if alpha is None else alpha),
                   tuple(binding.feed_forward), base_fingerprint(model_patcher, binding), dict(training or {}))

    def patch_features(self, factor: int) -> int:
        return self.latent_channels * self.temporal_patch * (factor * self.native_patch) ** 2

    @property
    def lora_scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    def to_metadata(self) -> dict[str, str]:
        return spec_metadata(self, FORMAT, FORMAT_VERSION)

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str = "adapter") -> "AdapterSpec":
        check_format(meta, FORMAT, FORMAT_VERSION, AdapterError, source, "patch adapter", "")
        try:
            raw = spec_fields(cls, meta)
            raw["factors"] = tuple(int(k) for k in raw["factors"])
            raw["lora_targets"] = tuple(raw.get("lora_targets", ()))
            return cls(**raw)
        except (KeyError, TypeError, ValueError) as e:
            raise AdapterError(f"{source}: damaged adapter metadata ({e})") from e


class CoarseAdapter(nn.Module):
    """The learned layers of one coarse factor (all zero-initialised: an identity correction)."""

    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.embed = nn.Linear(features, hidden, bias=False)
        self.size_embedding = nn.Parameter(torch.zeros(hidden))
        self.deembed = nn.Linear(hidden, features, bias=False)
        self.residual = nn.Linear(features, features, bias=False)
        for layer in (self.embed, self.deembed, self.residual):
            nn.init.zeros_(layer.weight)

    def token_correction(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, F) full-resolution input patches -> (B, N, D) added to the embedded tokens."""
        return self.embed(patches) + self.size_embedding

    def output_correction(self, hidden: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, D) last hidden state + (B, N, F) input patches -> (B, N, F) added to the clean estimate."""
        normed = torch.nn.functional.layer_norm(hidden, hidden.shape[-1:], eps=1e-6)
        return self.deembed(normed) + self.residual(patches)


class PatchAdapter(nn.Module):
    """All coarse factors of one adapter, plus its LoRA tensors (``lora[k][module] = (A, B)``)."""

    def __init__(self, spec: AdapterSpec, lora: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None):
        super().__init__()
        self.spec = spec
        self.coarse = nn.ModuleDict({str(k): CoarseAdapter(spec.patch_features(k), spec.hidden_size)
                                     for k in spec.factors})
        self.lora = lora or {}
        self._lora_cache: dict = {}

    def part(self, factor: int) -> CoarseAdapter | None:
        return self.coarse[str(factor)] if str(factor) in self.coarse else None

    def lora_for(self, factor: int, device, dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """LoRA of ``factor`` on ``device``/``dtype`` (converted once, then cached)."""
        key = (factor, str(device), dtype)
        if key not in self._lora_cache:
            self._lora_cache[key] = {name: (a.to(device, dtype), b.to(device, dtype))
                                     for name, (a, b) in self.lora.get(factor, {}).items()}
        return self._lora_cache[key]

    def parameter_count(self) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n + sum(a.numel() + b.numel() for layers in self.lora.values() for a, b in layers.values())


# ----------------------------------------------------------------------------- files

def state_dict_for_file(adapter: PatchAdapter) -> dict[str, torch.Tensor]:
    tensors = {f"coarse.{name}": t.detach().float().contiguous().cpu()
               for name, t in adapter.coarse.state_dict().items()}
    for k, layers in adapter.lora.items():
        for module, (a, b) in layers.items():
            tensors[f"lora.{k}.{module}.lora_A.weight"] = a.detach().float().contiguous().cpu()
            tensors[f"lora.{k}.{module}.lora_B.weight"] = b.detach().float().contiguous().cpu()
    return tensors


def save_adapter(adapter: PatchAdapter, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state_dict_for_file(adapter), str(tmp), metadata=adapter.spec.to_metadata())
    tmp.replace(path)  # never a half-written adapter under the final name
    return path


def load_adapter(path: str | Path) -> PatchAdapter:
    """Read an adapter; only ``.safetensors`` (no pickle is ever loaded), only finite tensors."""
    path = Path(path)
    meta, tensors = read_safetensors(path, AdapterError, "patch adapters", "adapter file")
    spec = AdapterSpec.from_metadata(meta, path.name)
    for key, t in tensors.items():  # a NaN/inf weight would turn every coarse step into NaN latents
        if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
            bad = int((~torch.isfinite(t.float())).sum())
            raise AdapterError(f"{path.name}: tensor {key!r} has {bad} NaN/inf value(s) of {t.numel()}; "
                               f"the adapter is damaged (or its training diverged). Retrain it or use "
                               f"another checkpoint.")
    lora: dict[int, dict[str, list]] = {}
    coarse = {}
    for key, t in tensors.items():
        if key.startswith("coarse."):
            coarse[key[len("coarse."):]] = t
        elif key.startswith("lora.") and key.endswith((".lora_A.weight", ".lora_B.weight")):
            k, _, rest = key[len("lora."):].partition(".")
            module, which = rest[: -len(".lora_A.weight")], rest[-len("A.weight")]
            lora.setdefault(int(k), {}).setdefault(module, [None, None])["AB".index(which)] = t
        else:
            raise AdapterError(f"{path.name}: unexpected tensor {key!r} (not a patch adapter file?)")
    pairs = {}
    for k, layers in lora.items():
        for module, (a, b) in layers.items():
            if a is None or b is None:
                raise AdapterError(f"{path.name}: LoRA of {module} ({k}p) has only one of lora_A / lora_B")
        pairs[k] = {m: (a, b) for m, (a, b) in layers.items()}
    adapter = PatchAdapter(spec, pairs)
    try:
        adapter.coarse.load_state_dict(coarse, strict=True)
    except RuntimeError as e:
        raise AdapterError(f"{path.name}: tensors do not match its metadata ({e})") from e
    return adapter.eval().requires_grad_(False)
