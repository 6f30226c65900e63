"""Files of the ideas' learned parts (patch adapters, token routers, merge patterns): reading
them, and checking that one was made for the MODEL it is attached to.

Every learned file is one ``.safetensors`` (never pickle) whose metadata names the family and
geometry it was trained for and carries a fingerprint of the base weights, so a file of another
model is refused with a message instead of silently degrading the images.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

FINGERPRINT_SAMPLES = 256
FINGERPRINT_MIN_COSINE = 0.98  # fp8 / bf16 casts of the same weights stay above 0.99


ADAPTER_FORMAT = "elastic_tokens.patch_adapter"
ROUTER_FORMAT = "elastic_tokens.token_router"
PATTERN_FORMAT = "elastic_tokens.merge_pattern"
PACK_FORMATS = (ADAPTER_FORMAT, ROUTER_FORMAT, PATTERN_FORMAT)
TRAIN_COMMAND = "scripts/train_patch_adapter.py"


def spec_metadata(spec, fmt: str, version: int) -> dict[str, str]:
    """A learned file's spec (a dataclass) as safetensors metadata: format, version, and every
    field as JSON (tuples as lists)."""
    meta = {"format": fmt, "version": str(version)}
    for key, value in asdict(spec).items():
        meta[key] = json.dumps(list(value) if isinstance(value, tuple) else value)
    return meta


def check_format(meta: dict, fmt: str, version: int, error: type[Exception], source: str, noun: str,
                 train: str) -> None:
    """``error`` unless ``meta`` is of format ``fmt`` at a version this pack reads (1..``version``): a
    patch adapter given to another loader is named as one; other files are told how to make the
    right one (``train``: the training command's arguments)."""
    found = (meta or {}).get("format")
    if found == ADAPTER_FORMAT and fmt != ADAPTER_FORMAT:
        raise error(f"{source} is a patch adapter, not a {noun}. Load it with the 'Load Patch Adapter' "
                    f"node (it serves the Dynamic Patch Schedule).")
    if found != fmt:
        raise error(f"{source} is not an Elastic Tokens {noun} (no '{fmt}' metadata). Train one with "
                    f"{' '.join([TRAIN_COMMAND, train]).strip()}.")
    try:
        found_version = int(meta.get("version", "0"))
    except ValueError:
        found_version = -1
    if not 1 <= found_version <= version:
        raise error(f"{source} has {noun} format version {meta.get('version')!r}; this Elastic Tokens "
                    f"reads 1..{version}. Update the node pack.")


def spec_fields(cls, meta: dict) -> dict:
    """The JSON-decoded metadata entries that are fields of the spec dataclass ``cls``."""
    return {k: json.loads(meta[k]) for k in cls.__dataclass_fields__ if k in meta}


def file_format(path) -> str | None:
    """The ``format`` metadata of a .safetensors file, read from its header only (a loader's file
    list reads every file in the folder); None when it has none, is not readable or is gone."""
    from safetensors import safe_open

    if path is None:
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get("format")
    except Exception:  # safetensors raises its own error types for damaged headers, OSError when gone
        return None


def listed_for(fmt: str, names: list[str], full_path) -> list[str]:
    """The file names a loader of ``fmt`` offers: all but the pack's files of another kind (a
    patch adapter is not offered as a token router); files without the pack's metadata stay, so
    picking one still gets the loader's own message."""
    keep = []
    for name in names:
        other = file_format(full_path(name))
        if other == fmt or other not in PACK_FORMATS:
            keep.append(name)
    return keep


def read_safetensors(path: Path, error: type[Exception], kind: str, noun: str) -> tuple[dict, dict]:
    """``(metadata, tensors)`` of a learned file, or ``error`` saying why not: ``kind`` (e.g.
    "token routers") are loaded from .safetensors files only; the ``noun`` ("token router file")
    was not found; not a readable safetensors file."""
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        raise error(f"{path.name}: {kind} are loaded from .safetensors files only")
    if not path.is_file():
        raise error(f"{noun} not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise error(f"{path.name}: not a readable safetensors file ({e})") from e


def check_fits(model_patcher, spec, binding, name: str, error: type[Exception], *, word: str, a_word: str,
               fields: tuple[str, ...], retrain: str, after_geometry=None) -> None:
    """Raise ``error`` if the file whose ``spec`` is given was not made for this model: another
    family, another geometry (``fields``: attributes that ``spec`` and ``binding`` both have, in
    the order the message lists them), ``after_geometry()`` (a file's own extra check), or other
    base weights (fingerprint). ``word`` / ``a_word``: "router" / "a token router"; ``retrain``:
    how to make one for this model."""
    if spec.family != binding.family:
        raise error(f"{name} was trained for a {spec.family.upper()} model; this MODEL is "
                    f"{binding.family.upper()}. Load {a_word} trained on this model.")
    mismatch = [f"{field.replace('_', ' ')} {getattr(spec, field)} vs. model {getattr(binding, field)}"
                for field in fields if getattr(spec, field) != getattr(binding, field)]
    if mismatch:
        raise error(f"{name} does not fit this {binding.family.upper()} model: {word} "
                    + f"; {word} ".join(mismatch) + ". It was trained on another model.")
    if after_geometry is not None:
        after_geometry()
    problems = fingerprint_problems(spec.fingerprint, base_fingerprint(model_patcher, binding))
    if problems:
        raise error(f"{name} was trained on other base weights than this MODEL ("
                    + "; ".join(problems[:2]) + f"). Train {retrain}")


def fingerprint(named: dict[str, torch.Tensor], samples: int = FINGERPRINT_SAMPLES) -> dict:
    """A few hundred strided values of each tensor (by name), enough to recognise the weights.

    Compared by cosine similarity (:func:`fingerprint_problems`), so casts (bf16, fp16, fp8 with a
    per-tensor scale) of the same base model still match, while another model does not.
    """
    out = {}
    for name, t in named.items():
        flat = t.detach().reshape(-1)
        k = min(samples, flat.numel())
        # round(i * (n - 1) / (k - 1)) in exact integers (a float32 linspace overshoots the end for
        # tensors of ~10^7 elements; for small ones this equals it, so older files still match)
        n, d = flat.numel() - 1, max(k - 1, 1)
        idx = torch.tensor([(2 * i * n + d) // (2 * d) for i in range(k)], device=flat.device)
        values = flat[idx].float().cpu().tolist()
        out[name] = {"shape": list(t.shape), "values": [float(f"{v:.5g}") for v in values]}
    return out


def fingerprint_problems(stored: dict, current: dict) -> list[str]:
    """Why ``current`` weights are not the ones ``stored`` was taken from (empty: they match)."""
    problems = []
    for name, ref in stored.items():
        cur = current.get(name)
        if cur is None:
            continue  # not readable here (e.g. a quantised format): not evidence of a mismatch
        if list(cur["shape"]) != list(ref["shape"]):
            problems.append(f"{name} has shape {cur['shape']}, the adapter expects {ref['shape']}")
            continue
        a = torch.tensor(ref["values"], dtype=torch.float64)
        b = torch.tensor(cur["values"], dtype=torch.float64)
        denom = float(a.norm() * b.norm())
        cos = float(a @ b) / denom if denom > 0 else (1.0 if float((a - b).abs().max()) == 0 else 0.0)
        if not math.isfinite(cos) or cos < FINGERPRINT_MIN_COSINE:
            problems.append(f"{name} differs (similarity {cos:.3f})")
    return problems


def base_fingerprint(model_patcher, binding) -> dict:
    """Fingerprint of the base weights as loaded, before any user LoRA (uses ComfyUI's backups)."""
    dm = model_patcher.model.diffusion_model
    backup = getattr(model_patcher, "backup", {}) or {}
    named = {}
    for name in binding.fingerprint_names:
        key = f"diffusion_model.{name}"
        try:
            t = backup[key].weight if key in backup else dm.get_parameter(name)
            named[name] = t.float() if t.dtype not in (torch.float32, torch.float16, torch.bfloat16) else t
        except Exception:  # quantised or unusual storage: skip, the check then relies on the rest
            continue
    return fingerprint(named)
