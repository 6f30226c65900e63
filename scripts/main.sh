#!/usr/bin/env bash
# The main job: build/refresh the pinned runtime (.venv), then run the example workflows in a real
# headless ComfyUI, baseline vs. Dynamic Patch Schedule (bench/run_example.py; arguments go to it).
# Default: the TRAINED proxy models (benchmarks/proxy) through the proxy workflows, writing a sample
# grid and a per-step schedule plot per workflow to out/ (the video proxy is skipped, with a message,
# until benchmarks/proxy/video_proxy.safetensors exists). `bash scripts/main.sh --models tiny` runs the
# FLUX.1-dev / Wan 2.1 example workflows on tiny random-weight stand-ins instead.
# It prints a line per prompt with the sampler's step as it advances; ComfyUI's own output (import
# messages, warnings) goes to out/comfyui_server.log. No time limit per prompt unless
# `--timeout SECONDS` (or ELASTIC_TOKENS_PROMPT_TIMEOUT) sets one.
# Times on a quiet 2-core CPU: the first install about 3 min, then the job about 105 s (README).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ ! -f .venv/.elastic_tokens_runtime_stamp ]]; then
  echo "First run: installing the pinned CPU runtime (torch, ComfyUI) into .venv/ -- about 3 min on a" \
       "quiet 2-core machine with a fast network ..." >&2
fi
comfyui="$(ELASTIC_TOKENS_NO_BROWSER=1 bash scripts/install_runtime.sh)"  # the browser test's Chromium: not needed here
version="$(sed -n 's/^__version__ *= *"\(.*\)"/\1/p' "$comfyui/comfyui_version.py" 2>/dev/null || true)"
echo "Runtime: .venv (ComfyUI ${version:-?} at $comfyui)"
exec .venv/bin/python bench/run_example.py "$@"
