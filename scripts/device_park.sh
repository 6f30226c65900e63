#!/usr/bin/env bash
# Park tracked files that a device call does not need, so the working tree fits the device's
# 64 MiB per call (tracked files are ~86 MiB: proxies, adapters and raw benchmark output), and put
# them back afterwards. Parked files go to .parked/ (ignored through .git/info/exclude, so they do
# not travel); nothing is deleted, and `restore` refuses to overwrite.
#
#   bash scripts/device_park.sh park [GROUP ...]   # default groups: results
#   bash scripts/device_park.sh restore            # everything parked goes back
#
# Groups: results (benchmarks/quality_proxy, 48 MiB), video (video proxy + its adapter, 23 MiB),
# image (image proxy + its adapters, 31 MiB), all (the three). Typical calls: FID parts travel with
# `park results` (image + video stay, ~48 MiB) or `park all` (~1 MiB of code); a call that needs a
# parked proxy copies it to /tmp on the device in an earlier call (scripts/device_quality_carry.sh).
# Run `restore` before committing: `git status` must show no deletions.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
grep -qx '/.parked/' .git/info/exclude 2>/dev/null || printf '/.parked/\n' >> .git/info/exclude
P=benchmarks/proxy

paths_of() {
  case "$1" in
    results) echo benchmarks/quality_proxy ;;
    video) echo $P/video_proxy.safetensors $P/video_proxy_text.safetensors $P/video_proxy_samples.png \
                $P/adapters/video_proxy_adapter_2p4p.safetensors ;;
    image) echo $P/image_proxy.safetensors $P/image_proxy_text.safetensors $P/image_proxy_samples.png \
                $P/adapters/image_proxy_adapter_2p.safetensors $P/adapters/image_proxy_adapter_2p_v2.safetensors \
                $P/adapters/image_proxy_adapter_2p_sched.safetensors $P/adapters/image_proxy_adapter_2x19.safetensors \
                $P/adapters/image_proxy_adapter_2x21_30steps.safetensors ;;
    all) paths_of results; paths_of video; paths_of image ;;
    *) echo "unknown group: $1 (results, video, image, all)" >&2; return 1 ;;
  esac
}

case "${1:-}" in
  park)
    shift
    groups=("${@:-results}")
    for g in "${groups[@]}"; do paths_of "$g" >/dev/null || exit 2; done
    for g in "${groups[@]}"; do
      for path in $(paths_of "$g"); do
        [ -e "$path" ] || continue
        mkdir -p ".parked/$(dirname "$path")"
        mv "$path" ".parked/$path"
      done
    done
    echo "tracked files left to travel: $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | awk '{printf "%.1f MiB", $1 / 1048576}')"
    ;;
  restore)
    [ -d .parked ] || { echo "nothing parked"; exit 0; }
    (cd .parked && find . -type f -o -type d -empty) | while read -r rel; do
      rel="${rel#./}"
      [ -d ".parked/$rel" ] && continue
      if [ -e "$rel" ]; then echo "refusing to overwrite $rel (its parked copy stays in .parked/)" >&2; exit 1; fi
      mkdir -p "$(dirname "$rel")"
      mv ".parked/$rel" "$rel"
    done
    find .parked -depth -type d -empty -delete
    git status --short | grep '^ D' && { echo "still missing (see above)" >&2; exit 1; } || echo "restored"
    ;;
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac
