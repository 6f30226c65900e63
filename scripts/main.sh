#!/usr/bin/env bash
# The main job: build/refresh the pinned runtime (.venv), then run the example workflows in a real
# headless ComfyUI, baseline vs. Dynamic Patch Schedule (bench/run_example.py; arguments go to it).
# Default: the TRAINED proxy models (benchmarks/proxy) through the proxy workflows, writing a sample
# grid and a per-step schedule plot per workflow to out/ (the video proxy is skipped, with a message,
# until benchmarks/proxy/video_proxy.safetensors exists). `bash scripts/main.sh --models tiny` runs the
# FLUX.1-dev / Wan 2.1 example workflows on tiny random-weight stand-ins instead.
# About 30 s for the image proxy on a quiet 2-core CPU once .venv exists.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
comfyui="$(bash scripts/install_runtime.sh)"
echo "Runtime: .venv (ComfyUI 0.3.75 at $comfyui)"
exec .venv/bin/python bench/run_example.py "$@"
