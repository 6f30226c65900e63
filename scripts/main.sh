#!/usr/bin/env bash
# The main job: build/refresh the pinned runtime (.venv), then run the example workflows in a real
# headless ComfyUI, baseline vs. Dynamic Patch Schedule (scripts/run_example.py; arguments go to it,
# e.g. `bash scripts/main.sh --workflow flux`). About a minute on a quiet 2-core CPU once .venv exists.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
comfyui="$(bash scripts/install_runtime.sh)"
echo "Runtime: .venv (ComfyUI 0.3.75 at $comfyui)"
exec .venv/bin/python scripts/run_example.py "$@"
