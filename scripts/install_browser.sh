#!/usr/bin/env bash
# What the browser test (tests/test_browser.py) needs, installed where it can be; never fatal: the
# test SKIPS, saying what is missing, where something could not be installed.
#  * the ComfyUI frontend that the ComfyUI under test asks for (comfyui-frontend-package==X in its
#    requirements.txt), unpacked into .runtime/frontend/X/ with `pip install --target` (the shared
#    .venv is not changed; one folder per version, so two ComfyUI versions can be tested);
#  * headless Chromium from Debian's packages (`apt-get install chromium`, as root), unless a
#    Chromium/Chrome is already on PATH or $CHROME_BIN names one.
# Idempotent (a second run with everything present is instant); messages go to stderr.
# Usage: bash scripts/install_browser.sh   (after scripts/install_runtime.sh: it needs .venv)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
say() { echo "install_browser: $*" >&2; }
status=0

# ---- the frontend package the ComfyUI under test pins
if [[ ! -x "$PY" ]]; then
  say "no .venv yet (run scripts/install_runtime.sh first); frontend not installed"; status=1
else
  comfyui="$(PYTHONPATH="$ROOT/tests/support" "$PY" -c 'import comfy_runtime; print(comfy_runtime.comfyui_path())' 2>/dev/null)"
  version="$(sed -n 's/^comfyui-frontend-package *== *\([0-9][0-9.]*\).*/\1/p' "$comfyui/requirements.txt" 2>/dev/null | head -1)"
  if [[ -z "$version" ]]; then
    say "no comfyui-frontend-package==X in ${comfyui:-?}/requirements.txt; frontend not installed"; status=1
  else
    dest="$ROOT/.runtime/frontend/$version"
    if [[ -f "$dest/comfyui_frontend_package/static/index.html" ]]; then
      :  # already there
    else
      rm -rf "$dest.partial"
      if "$PY" -m pip install -q --no-deps --disable-pip-version-check --target "$dest.partial" \
           "comfyui-frontend-package==$version" 2> >(grep -v -e 'is ignored: it is neither' -e '^$' >&2) \
         && [[ -f "$dest.partial/comfyui_frontend_package/static/index.html" ]]; then
        rm -rf "$dest" && mv "$dest.partial" "$dest"
        say "ComfyUI frontend $version in ${dest#"$ROOT"/}"
      else
        rm -rf "$dest.partial"
        say "could not install comfyui-frontend-package==$version (pip); the browser test will skip"; status=1
      fi
    fi
  fi
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
