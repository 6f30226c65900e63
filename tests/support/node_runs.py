"""Shortcuts the runtime tests share: a run through ComfyUI's real KSampler path, the Token Merge
node on every step, and a snapshot of a MODEL's options (to check a node left its input alone)."""

from __future__ import annotations


def ksample(model, positive, negative, latent, steps=6, cfg=1.0, seed=3, sampler="euler"):
    """``nodes.common_ksampler`` (what the KSampler node runs), ``sampler``/simple; the latent samples."""
    import nodes

    (out,) = nodes.common_ksampler(model, seed, steps, cfg, sampler, "simple", positive, negative, latent)
    return out["samples"]


def token_merge(model, **settings):
    """``model`` with the Token Merge node applied, its window over every step unless set."""
    from elastic_tokens.ideas.merge import apply_token_merge
    from elastic_tokens.ideas.merge.config import TokenMergeConfig

    settings.setdefault("end_percent", 1.0)
    return apply_token_merge(model, TokenMergeConfig(**settings))


def options_snapshot(model):
    """What a node must not change on the MODEL it was given."""
    opts = model.model_options
    t = opts.get("transformer_options", {})
    return repr(sorted(opts)), repr(t.get("wrappers")), set(t), repr(t.get("patches_replace"))
