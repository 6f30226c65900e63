"""Learned token-router files: format, loading, the model check, attaching to a MODEL.

File format: one ``.safetensors`` (never pickle) with the :class:`~.router_net.RouterNet` state
(``net.*``: the input standardisation and the conv weights) and metadata ``format`` =
``elastic_tokens.token_router``, ``version`` and the JSON fields of :class:`RouterSpec` (family,
patch sizes, latent channels, inputs, width, base-model fingerprint, training facts). The
fingerprint is the patch adapters' (ideas/patch/adapter_file.py): the router learned which
tokens *this* model's velocity changes at, so a file of other base weights is refused.

Attaching: :func:`attach_router` returns a clone of the MODEL whose ``transformer_options``
carry the router (one shared read-only holder, as patch adapters ride); the Elastic Token
Router's ``learned`` scorer reads it when sampling starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..learned_file import (ROUTER_FORMAT, base_fingerprint, check_fits, check_format, read_safetensors,
                            spec_fields, spec_metadata)
from .router_net import FEATURES, RouterNet, feature_count

FORMAT = ROUTER_FORMAT
FORMAT_VERSION = 1
ROUTER_KEY = "elastic_tokens_token_router"
log = logging.getLogger("elastic_tokens")


class RouterFileError(ValueError):
    """A router file that cannot be used with this model (the message says why and what to do)."""


@dataclass(frozen=True)
class RouterSpec:
    family: str
    native_patch: int
    temporal_patch: int
    latent_channels: int
    width: int = 16
    inputs: tuple[str, ...] = FEATURES
    fingerprint: dict = field(default_factory=dict, compare=False)
    training: dict = field(default_factory=dict, compare=False)

    @classmethod
    def for_model(cls, model_patcher, binding, width: int = 16, training: dict | None = None) -> "RouterSpec":
        return cls(binding.family, binding.native_patch, binding.temporal_patch, binding.latent_channels,
                   width, FEATURES, base_fingerprint(model_patcher, binding), dict(training or {}))

    @property
    def features(self) -> int:
        return feature_count(self.latent_channels, self.native_patch, self.temporal_patch)

    def to_metadata(self) -> dict[str, str]:
        return spec_metadata(self, FORMAT, FORMAT_VERSION)

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str = "router") -> "RouterSpec":
        check_format(meta, FORMAT, FORMAT_VERSION, RouterFileError, source, "token router", "--mode router")
        try:
            raw = spec_fields(cls, meta)
            raw["inputs"] = tuple(raw.get("inputs", ()))
            spec = cls(**raw)
        except (KeyError, TypeError, ValueError) as e:
            raise RouterFileError(f"{source}: damaged token-router metadata ({e})") from e
        if spec.inputs != FEATURES:
            raise RouterFileError(f"{source} reads inputs {list(spec.inputs)}; this Elastic Tokens computes "
                                  f"{list(FEATURES)}. Retrain the router with this version.")
        return spec


class TokenRouter:
    """A loaded router: its spec and network (float32, CPU; device copies made once)."""

    def __init__(self, spec: RouterSpec, net: RouterNet):
        self.spec = spec
        self.net = net.eval().requires_grad_(False)
        self._copies: dict = {}

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options: share, never copy
        return self

    def on(self, device) -> RouterNet:
        key = str(device)
        if key not in self._copies:
            import copy

            self._copies[key] = copy.deepcopy(self.net).to(device)
        return self._copies[key]

    @torch.no_grad()
    def logits(self, feats: torch.Tensor, grid) -> torch.Tensor:
        return self.on(feats.device)(feats.float(), grid)


def new_router(spec: RouterSpec) -> TokenRouter:
    return TokenRouter(spec, RouterNet(spec.features, spec.width))


def save_router(net: RouterNet, spec: RouterSpec, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.detach().float().contiguous().cpu() for k, v in net.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=spec.to_metadata())
    tmp.replace(path)
    return path


def load_router(path: str | Path) -> TokenRouter:
    """Read a router file (``.safetensors`` only, finite tensors only)."""
    path = Path(path)
    meta, tensors = read_safetensors(path, RouterFileError, "token routers", "token router file")
    spec = RouterSpec.from_metadata(meta, path.name)
    state = {}
    for key, t in tensors.items():
        if not key.startswith("net."):
            raise RouterFileError(f"{path.name}: unexpected tensor {key!r} (not a token router file?)")
        if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
            raise RouterFileError(f"{path.name}: tensor {key!r} has NaN/inf values; the router is damaged "
                                  f"(or its training diverged). Retrain it.")
        state[key[len("net."):]] = t.float()
    net = RouterNet(spec.features, spec.width)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RouterFileError(f"{path.name}: tensors do not match its metadata ({e})") from e
    return TokenRouter(spec, net)


def check_router(model_patcher, router: TokenRouter, binding, name: str = "router") -> None:
    """Raise :class:`RouterFileError` if ``router`` was not trained on this model."""
    check_fits(model_patcher, router.spec, binding, name, RouterFileError, word="router", a_word="a token router",
               fields=("native_patch", "temporal_patch", "latent_channels"),
               retrain="a router for this model with scripts/train_patch_adapter.py --mode router.")


def attach_router(model_patcher, router: TokenRouter, name: str = "router"):
    """A clone of ``model_patcher`` carrying ``router`` for the ``learned`` scorer; the input is unchanged."""
    from ...families import binding_for

    binding = binding_for(model_patcher)
    check_router(model_patcher, router, binding, name)
    patched = model_patcher.clone()
    patched.model_options.setdefault("transformer_options", {})[ROUTER_KEY] = router
    trained = router.spec.training
    log.info(f"Elastic Tokens: token router {name} ({router.net.parameter_count()} parameters, "
             f"{trained.get('steps', '?')} training steps) attached; the Elastic Token Router's "
             f"'learned' scorer uses it")
    return patched


def attached_router(model_patcher) -> TokenRouter | None:
    opts = getattr(model_patcher, "model_options", {}) or {}
    return opts.get("transformer_options", {}).get(ROUTER_KEY)
