#!/usr/bin/env bash
# The test command: builds/refreshes the pinned runtime (.venv) then runs pytest on tests/.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not server" -k flux`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install_runtime.sh >/dev/null
exec .venv/bin/python -m pytest -q tests "$@"
