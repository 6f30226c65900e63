"""Elastic Tokens: spend fewer transformer tokens where the image does not need them.

ComfyUI loads this folder as a custom node pack and calls :func:`comfy_entrypoint`.
Nothing ComfyUI-specific is imported at module import time, so ``kernels`` stays
importable (and testable) with torch alone.
"""

__version__ = "0.3.0"


def last_run_report(model):
    """The report of ``model``'s latest sampling run (runtime/report.py), or None."""
    from .runtime.report import last_run_report as report

    return report(model)


def comfy_entrypoint():
    """V3 entry point: ComfyUI asks the pack for its extension object."""
    from .nodes.extension import ElasticTokensExtension

    return ElasticTokensExtension()
