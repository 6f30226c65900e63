#!/usr/bin/env bash
# What the browser test (tests/test_browser.py) needs, installed where it can be; never fatal: the
# test SKIPS, saying what is missing, where something could not be installed.
#  * the ComfyUI frontend that each ComfyUI under test asks for (comfyui-frontend-package==X in its
#    requirements.txt: the one tests/support/comfy_runtime.py resolves, and any unpacked under
#    .runtime/ComfyUI-*/), unpacked into .runtime/frontend/X/ with `pip install --target` (the shared
#    .venv is not changed; one folder per version);
#  * headless Chromium from Debian's packages (`apt-get install chromium`, as root), unless a
#    Chromium/Chrome is already on PATH or $CHROME_BIN names one.
# Idempotent (a second run with everything present is instant); messages go to stderr.
# Usage: bash scripts/install_browser.sh   (after scripts/install_runtime.sh: it needs .venv)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
say() { echo "install_browser: $*" >&2; }
status=0

# ---- the frontend package each ComfyUI the tests run against pins: the one tests/support/comfy_runtime.py
# resolves ($COMFYUI_PATH, else the vendored 0.3.75) and any unpacked under .runtime/ComfyUI-*/
install_frontend() {  # install_frontend COMFYUI_DIR
  local version dest
  version="$(sed -n 's/^comfyui-frontend-package *== *\([0-9][0-9.]*\).*/\1/p' "$1/requirements.txt" 2>/dev/null | head -1)"
  if [[ -z "$version" ]]; then
    say "no comfyui-frontend-package==X in $1/requirements.txt; its frontend not installed"; return 1
  fi
  dest="$ROOT/.runtime/frontend/$version"
  [[ -f "$dest/comfyui_frontend_package/static/index.html" ]] && return 0
  rm -rf "$dest.partial"
  if "$PY" -m pip install -q --no-deps --disable-pip-version-check --target "$dest.partial" \
       "comfyui-frontend-package==$version" 2> >(grep -v -e 'is ignored: it is neither' -e '^$' >&2) \
     && [[ -f "$dest.partial/comfyui_frontend_package/static/index.html" ]]; then
    rm -rf "$dest" && mv "$dest.partial" "$dest"
    say "ComfyUI frontend $version (for $1) in ${dest#"$ROOT"/}"
  else
    rm -rf "$dest.partial"
    say "could not install comfyui-frontend-package==$version (pip); the browser test will skip there"; return 1
  fi
}
if [[ ! -x "$PY" ]]; then
  say "no .venv yet (run scripts/install_runtime.sh first); frontend not installed"; status=1
else
  comfyuis=("$(PYTHONPATH="$ROOT/tests/support" "$PY" -c 'import comfy_runtime; print(comfy_runtime.comfyui_path())' 2>/dev/null)")
  for dir in "$ROOT"/.runtime/ComfyUI-*/; do
    [[ -f "$dir/requirements.txt" ]] && comfyuis+=("${dir%/}")
  done
  for dir in "${comfyuis[@]}"; do
    [[ -n "$dir" ]] || continue
    install_frontend "$dir" || status=1
  done
fi

# ---- headless Chromium
find_chrome() {
  if [[ -n "${CHROME_BIN:-}" && -x "${CHROME_BIN}" ]]; then echo "$CHROME_BIN"; return 0; fi
  local name
  for name in chromium chromium-browser google-chrome google-chrome-stable chrome chrome-headless-shell; do
    command -v "$name" 2>/dev/null && return 0
  done
  return 1
}
if ! find_chrome >/dev/null; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    start=$SECONDS
    say "installing chromium (Debian package) ..."
    if ! apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; then
      apt-get update -qq >/dev/null 2>&1 || true
      apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || true
    fi
    if find_chrome >/dev/null; then
      say "chromium installed in $((SECONDS - start)) s"
    else
      say "apt-get install chromium failed; the browser test will skip"; status=1
    fi
  else
    say "no Chromium found; install it (e.g. sudo apt-get install chromium) or set CHROME_BIN; the browser test will skip"
    status=1
  fi
fi
exit $status
