"""Learned merge patterns (LGM): a per-position embedding trained on a model, its file, its use.

A learned pattern is an embedding ``E`` of every token position of one token grid
``(frames, rows, cols)``, ``d`` numbers per position (16 by default). Training (``--mode pattern``
of the training command, training/pattern.py) makes ``cos(E_i, E_j)`` rank pairs of nearby
tokens as the model's own outputs do: tokens whose outputs are alike point the same way. At
sampling, the embedding is clustered into the pattern of the node's ratio (kernels/merge_cluster.py:
average linkage, cosine distance, within local blocks, exact token count), once per grid, ratio
and video mode; the pattern is then run like any training-free one (runtime/merge_path.py).

File format: one ``.safetensors`` (never pickle) holding the tensor ``embedding``
``(frames, rows, cols, d)`` (float32, or float16 for large grids), metadata ``format``
(``elastic_tokens.merge_pattern``), ``version`` and the JSON fields of :class:`PatternSpec`
(family, token grid, patch, block size and video mode of training, the base-model fingerprint,
training facts and validation results).

The "Load Merge Pattern" node attaches a loaded pattern to a MODEL (a holder in the clone's
``transformer_options``, as Load Patch Adapter does); Token Merge with order ``learned`` uses it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...kernels.merge_cluster import LINKAGES, Dendrograms
from ...kernels.merge_pattern import VIDEO_MODES
from ..learned_file import (PATTERN_FORMAT, base_fingerprint, check_fits, check_format, read_safetensors,
                            spec_fields, spec_metadata)

FORMAT = PATTERN_FORMAT
FORMAT_VERSION = 1
PATTERN_KEY = "elastic_tokens_merge_pattern"
log = logging.getLogger("elastic_tokens")


class PatternError(ValueError):
    """A merge-pattern file that cannot be used here (the message says why and what to do)."""


@dataclass(frozen=True)
class PatternSpec:
    """Everything about a learned pattern except its embedding; stored as safetensors metadata."""

    family: str                          # "flux" or "wan"
    grid: tuple[int, int, int]           # token grid (frames, rows, cols) it was trained for
    native_patch: int
    temporal_patch: int
    latent_channels: int
    hidden_size: int
    dim: int                             # embedding size per position
    block: int = 4                       # spatial block side of the clustering
    video_mode: str = "within_frames"    # the blocks training compared tokens in
    max_group: int = 0                   # largest group (0 = a whole block)
    linkage: str = "average"             # agglomerative linkage (kernels/merge_cluster.py LINKAGES)
    fingerprint: dict = field(default_factory=dict, compare=False)
    training: dict = field(default_factory=dict, compare=False)

    @classmethod
    def for_model(cls, model_patcher, binding, grid, dim: int, block: int = 4, video_mode: str = "within_frames",
                  max_group: int = 0, training: dict | None = None, linkage: str = "average") -> "PatternSpec":
        return cls(binding.family, tuple(int(v) for v in grid), binding.native_patch, binding.temporal_patch,
                   binding.latent_channels, binding.hidden_size, int(dim), int(block), video_mode, int(max_group),
                   linkage, base_fingerprint(model_patcher, binding), dict(training or {}))

    def to_metadata(self) -> dict[str, str]:
        return spec_metadata(self, FORMAT, FORMAT_VERSION)

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str = "pattern") -> "PatternSpec":
        check_format(meta, FORMAT, FORMAT_VERSION, PatternError, source, "merge pattern", "--mode pattern")
        try:
            raw = spec_fields(cls, meta)
            raw["grid"] = tuple(int(v) for v in raw["grid"])
            spec = cls(**raw)
        except (KeyError, TypeError, ValueError) as e:
            raise PatternError(f"{source}: damaged merge-pattern metadata ({e})") from e
        if len(spec.grid) != 3 or min(spec.grid) < 1 or spec.dim < 1 or spec.block < 1 \
                or spec.video_mode not in VIDEO_MODES or spec.max_group < 0 or spec.linkage not in LINKAGES:
            raise PatternError(f"{source}: damaged merge-pattern metadata (grid {spec.grid}, dim {spec.dim}, "
                               f"block {spec.block}, video mode {spec.video_mode!r}, max group {spec.max_group}, "
                               f"linkage {spec.linkage!r})")
        return spec


def grid_text(grid) -> str:
    t, h, w = grid
    return f"{h}x{w} tokens" if t == 1 else f"{t} frames x {h}x{w} tokens"


class LearnedPattern:
    """An embedding on one grid; :meth:`pattern` gives ``(groups, sizes)`` per ratio and video
    mode (dendrograms once per mode, cuts once per ratio)."""

    def __init__(self, spec: PatternSpec, embedding: torch.Tensor, name: str = "pattern"):
        expected = (*spec.grid, spec.dim)
        if tuple(embedding.shape) != expected:
            raise PatternError(f"{name}: embedding has shape {tuple(embedding.shape)}, its metadata says {expected}")
        if not bool(torch.isfinite(embedding.float()).all()):
            raise PatternError(f"{name}: the embedding has NaN/inf values; the file is damaged (or its "
                               f"training diverged). Retrain it.")
        self.spec = spec
        self.embedding = embedding.detach().float().cpu().contiguous()
        self.name = name
        self._dendrograms: dict = {}

    def check_grid(self, grid) -> None:
        grid = tuple(int(v) for v in grid)
        if grid != self.spec.grid:
            raise PatternError(
                f"Token Merge: the merge pattern {self.name} was trained for a token grid of "
                f"{grid_text(self.spec.grid)}; this run has {grid_text(grid)}. Generate at the size the "
                f"pattern was trained for, or train one for this size (scripts/train_patch_adapter.py "
                f"--mode pattern with this width/height/length).")

    def dendrograms(self, mode: str) -> Dendrograms:
        if mode not in self._dendrograms:
            self._dendrograms[mode] = Dendrograms.from_embedding(
                self.embedding, self.spec.grid, mode, self.spec.block, self.spec.max_group or None, self.spec.linkage)
        return self._dendrograms[mode]

    def held_out_note(self, ratio: float) -> str | None:
        """A warning if training's held-out validation found a training-free order cheaper at the
        validated ratio nearest ``ratio`` (None if it did not, or if the file has no validation)."""
        try:
            val = self.spec.training["validation"]["costs"][self.spec.training["config"]["feature"]]
            near = min(val, key=lambda r: abs(float(r) - ratio))
            row = val[near]
            best = min((v, k) for k, v in row.items() if k != "learned")
        except (KeyError, TypeError, ValueError):
            return None
        if row["learned"] < best[0]:
            return None
        return (f"merge pattern {self.name}: on its training's held-out rollouts it merged worse than "
                f"'{best[1]}' at ratio {near} (cost {row['learned']:.4g} against {best[0]:.4g}); "
                f"order '{best[1]}' may do better, or retrain with more rollouts (--pool)")

    def pattern(self, grid, ratio: float, mode: str = "within_frames") -> tuple[torch.Tensor, torch.Tensor]:
        """``(groups, sizes)`` for ``grid`` (must be the trained one) at ``ratio``. Shared: do not modify."""
        self.check_grid(grid)
        return self.dendrograms(mode).pattern(ratio)


# ----------------------------------------------------------------------------- files

def save_pattern(pattern: LearnedPattern, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    e = pattern.embedding
    if e.numel() > 1 << 20:  # > 4 MB in float32: float16 is plenty for cosine ranks
        e = e.half()
    save_file({"embedding": e.contiguous()}, str(tmp), metadata=pattern.spec.to_metadata())
    tmp.replace(path)
    return path


def load_pattern(path: str | Path) -> LearnedPattern:
    """Read a merge pattern; ``.safetensors`` only (no pickle is ever loaded)."""
    path = Path(path)
    meta, tensors = read_safetensors(path, PatternError, "merge patterns", "merge pattern file")
    spec = PatternSpec.from_metadata(meta, path.name)
    keys = list(tensors)
    if keys != ["embedding"]:
        raise PatternError(f"{path.name}: expected one tensor 'embedding', found {keys[:4]}")
    embedding = tensors["embedding"]
    return LearnedPattern(spec, embedding, path.name)


# ----------------------------------------------------------------------------- attaching to a MODEL

class PatternHolder:
    """A loaded pattern in a MODEL's ``transformer_options``; shared, never copied by clone()."""

    def __init__(self, pattern: LearnedPattern):
        self.pattern = pattern

    def __deepcopy__(self, memo):
        return self


def check_pattern(model_patcher, pattern: LearnedPattern, binding) -> None:
    """Raise :class:`PatternError` with a readable reason if ``pattern`` was not made for this model."""
    check_fits(model_patcher, pattern.spec, binding, pattern.name, PatternError, word="pattern",
               a_word="a merge pattern", fields=("native_patch", "temporal_patch", "latent_channels", "hidden_size"),
               retrain="a merge pattern for this model with scripts/train_patch_adapter.py --mode pattern.")


def attach_merge_pattern(model_patcher, pattern: LearnedPattern):
    """A clone of ``model_patcher`` carrying ``pattern`` for Token Merge's order ``learned``; the
    input is not changed."""
    from ...families import binding_for

    binding = binding_for(model_patcher)
    check_pattern(model_patcher, pattern, binding)
    patched = model_patcher.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    options[PATTERN_KEY] = PatternHolder(pattern)
    log.info(f"Elastic Tokens: merge pattern {pattern.name} ({grid_text(pattern.spec.grid)}) attached; "
             f"Token Merge uses it with order 'learned'")
    return patched


def attached_pattern(options: dict | None) -> LearnedPattern | None:
    holder = (options or {}).get(PATTERN_KEY)
    return holder.pattern if isinstance(holder, PatternHolder) else None
