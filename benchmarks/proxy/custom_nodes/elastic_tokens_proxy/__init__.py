"""ComfyUI nodes for the trained proxy models (benchmarks/proxy), so proxy workflows run in ComfyUI.

Not part of the Elastic Tokens pack (``nodes/``): a benchmark helper. ComfyUI loads it from
``benchmarks/proxy/custom_nodes`` when started with
``--extra-model-paths-config benchmarks/proxy/comfyui_extra_paths.yaml`` (what
``bench/run_example.py`` does), or when this folder is linked into ``ComfyUI/custom_nodes/``.

* **Load Proxy Model** (``ElasticTokensProxyLoader``): ``family`` image | video -> MODEL and PROXY.
  The model is built by the family's provider, exactly as the quality benchmark builds it:
  ``image_provider.ImageProxyProvider.load`` (ComfyUI's Flux class from the file's metadata
  ``config``; Flux detection hard-codes 24 heads, so plain UNETLoader cannot load it) or
  ``video_provider.VideoProxyProvider.load`` (ComfyUI's own Wan detection + ModelSamplingSD3 at the
  file's ``sampling_shift``). Weights: ``benchmarks/proxy/{image,video}_proxy.safetensors`` or the
  providers' environment overrides (``ELASTIC_TOKENS_PROXY_WEIGHTS``,
  ``ELASTIC_TOKENS_VIDEO_PROXY_WEIGHTS``). A missing file is a clear error at this node.
* **Proxy Class Prompt** (``ElasticTokensProxyClassPrompt``): PROXY + a Fashion-MNIST class name ->
  positive and negative CONDITIONING (the provider's ``cond_for``: the class's 4 learned text
  tokens; the negative is the empty prompt, class index 10). ``all classes`` gives one entry of
  10 classes, so batch item ``i`` of the latent gets class ``i % 10`` (ComfyUI repeats / cuts the
  conditioning to the latent's batch).
* **Proxy Decode** (``ElasticTokensProxyDecode``): LATENT + PROXY -> IMAGE. Undoes
  ``process_latent_out`` and ``pixel_shuffle(4)`` (the providers' ``decode`` / ``decode_frames``):
  a 4-d image latent (B, 16, 32, 32) gives B 128x128 images; a 5-d video latent (B, 16, F, 16, 16)
  gives B*F 64x64 frames (clip after clip, as VAEDecode returns video frames).

The loader also adds an OUTER_SAMPLE wrapper (outermost, as it is added first) that logs, after
each sampling run, one line ``Proxy schedule: {json}`` with the patch-size factor and the image
tokens of every step: read from the Dynamic Patch Schedule's per-run report when the node is in
the graph (the pack's public ``last_run_report(model).step_factors``),
else every step native. bench/run_example.py reads it for its per-step schedule plot.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
from pathlib import Path

PROXY_DIR = Path(__file__).resolve().parents[2]  # benchmarks/proxy
REPO_ROOT = PROXY_DIR.parents[1]
REPORT_KEY = "elastic_tokens_proxy.schedule_report"
REPORT_PREFIX = "Proxy schedule:"
PROXY_TYPE = "ELASTIC_TOKENS_PROXY"
ALL_CLASSES = "all classes (batch item i -> class i % 10)"
FAMILIES = {"image": "image_provider.py", "video": "video_provider.py"}

log = logging.getLogger("elastic_tokens_proxy")


def provider_module(family: str):
    """benchmarks/proxy/<family>_provider.py, imported once (the same module the benchmarks use)."""
    name = f"_et_proxy_{family}_provider"
    mod = sys.modules.get(name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(name, PROXY_DIR / FAMILIES[family])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(name, None)
            raise
    return mod


def pack():
    """The Elastic Tokens pack this repo holds, as ComfyUI loaded it (by its folder name) or,
    outside a ComfyUI server, imported from the repo (its top level imports no ComfyUI)."""
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve() == REPO_ROOT / "__init__.py" and hasattr(module, "last_run_report"):
            return module
    spec = importlib.util.spec_from_file_location("elastic_tokens", REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("elastic_tokens", module)
    spec.loader.exec_module(module)
    return module


def class_names() -> list[str]:
    return list(provider_module("image").trainer().CLASS_NAMES)


# --------------------------------------------------------------------------- per-step schedule log

def schedule_report_wrapper(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: after the run, log the per-step patch factors and image tokens."""
    guider = executor.class_obj
    noise = args[0] if args else kwargs["noise"]
    sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
    last_run_report = pack().last_run_report
    before = last_run_report(guider.model_options)
    out = executor(*args, **kwargs)
    steps = max(int(sigmas.shape[-1]) - 1, 0)
    report = last_run_report(guider.model_options)
    shape = tuple(noise.shape)
    if report is not None and report is not before and len(report.step_factors) == steps:
        source = " + ".join(dict.fromkeys(report.planners))
        factors, tokens = [int(k) for k in report.step_factors], [int(n) for n in report.step_tokens]
    else:
        families = importlib.import_module(pack().__name__ + ".families")
        native = families.binding_for(guider.model_patcher).grid_tokens(shape)
        source, factors, tokens = "plain model (no Elastic Tokens node)", [1] * steps, [native] * steps
    log.info("%s %s", REPORT_PREFIX, json.dumps({
        "source": source, "steps": steps, "latent": list(shape), "factors": factors, "tokens": tokens}))
    return out


# --------------------------------------------------------------------------- nodes

class ProxyLoader:
    DESCRIPTION = "Load a trained proxy model (benchmarks/proxy) as MODEL, plus its class prompts and decoder."
    CATEGORY = "elastic_tokens/proxy"
    RETURN_TYPES = ("MODEL", PROXY_TYPE)
    RETURN_NAMES = ("MODEL", "proxy")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(FAMILIES), {"default": "image",
                                                         "tooltip": "image: Flux-class, 128x128 gray; "
                                                                    "video: Wan-class, 9 frames 64x64"})}}

    def load(self, family: str):
        import comfy.patcher_extension as pe

        mod = provider_module(family)
        path = mod.weights_path()
        if not path.is_file():
            raise FileNotFoundError(f"Load Proxy Model: the {family} proxy weights {path} do not exist "
                                    f"(see benchmarks/proxy/train_{family}_proxy.py)")
        provider = mod.make_provider()
        model = provider.load()
        model.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, REPORT_KEY, schedule_report_wrapper)
        provider.family = family
        return (model, provider)


class ProxyClassPrompt:
    DESCRIPTION = "Class prompt of a proxy model: positive = the class's learned tokens, negative = empty prompt."
    CATEGORY = "elastic_tokens/proxy"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"proxy": (PROXY_TYPE,),
                             "class_name": (class_names() + [ALL_CLASSES], {"default": ALL_CLASSES})}}

    def encode(self, proxy, class_name: str):
        names = class_names()
        mod = provider_module(getattr(proxy, "family", "image"))
        labels = list(range(mod.NUM_CLASSES)) if class_name == ALL_CLASSES else [names.index(class_name)]
        return (proxy.cond_for(labels), proxy.cond_for([mod.EMPTY]))


class ProxyDecode:
    DESCRIPTION = "Decode a proxy latent to pixels (no VAE: pixel_shuffle of the raw latent)."
    CATEGORY = "elastic_tokens/proxy"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "proxy": (PROXY_TYPE,)}}

    def decode(self, samples, proxy):
        x = samples["samples"]
        family = getattr(proxy, "family", "image")
        if x.ndim == 4 and family == "image":
            images = proxy.decode(x)                        # (B, 3, H, W) in [0, 1]
            return (images.permute(0, 2, 3, 1).contiguous(),)
        if x.ndim == 5 and family == "video":
            frames = proxy.decode_frames(x)                 # (B, F, 3, H, W) in [0, 1]
            return (frames.flatten(0, 1).permute(0, 2, 3, 1).contiguous(),)
        raise ValueError(f"Proxy Decode: a {x.ndim}-d latent {tuple(x.shape)} does not fit the {family} proxy "
                         "(image: 4-d, video: 5-d)")


NODE_CLASS_MAPPINGS = {
    "ElasticTokensProxyLoader": ProxyLoader,
    "ElasticTokensProxyClassPrompt": ProxyClassPrompt,
    "ElasticTokensProxyDecode": ProxyDecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ElasticTokensProxyLoader": "Load Proxy Model",
    "ElasticTokensProxyClassPrompt": "Proxy Class Prompt",
    "ElasticTokensProxyDecode": "Proxy Decode",
}
