#!/usr/bin/env bash
# Fashion-MNIST (the proxies' data and FID reference) into .proxy_data/ (gitignored), from Debian's
# package dataset-fashion-mnist (30 MB): copied from /usr/share/datasets/fashion-mnist where the
# package is installed, else downloaded and unpacked here without installing it (needs apt-get; as
# root it refreshes the package lists once if they do not know the package). The GPU machine gets
# it through run's carry: [".proxy_data"]. Called by scripts/install_runtime.sh; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)
have() { for f in "${FILES[@]}"; do [ -s "$1/$f.gz" ] || return 1; done; }
have .proxy_data && exit 0
SRC=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if ! have "$SRC"; then
  command -v apt-get >/dev/null || { echo "proxy_data: no apt-get; install dataset-fashion-mnist or set FASHION_MNIST_DIR" >&2; exit 1; }
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  if ! (cd "$tmp" && apt-get download -q dataset-fashion-mnist >/dev/null 2>&1); then
    [ "$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1 || true
    (cd "$tmp" && apt-get download -q dataset-fashion-mnist >/dev/null) || {
      echo "proxy_data: could not download dataset-fashion-mnist (apt-get update as root first?)" >&2; exit 1; }
  fi
  dpkg -x "$tmp"/dataset-fashion-mnist_*.deb "$tmp/root"
  SRC=$(dirname "$(find "$tmp/root" -name train-images-idx3-ubyte.gz | head -1)")
  have "$SRC" || { echo "proxy_data: the package holds no idx files" >&2; exit 1; }
fi
mkdir -p .proxy_data
for f in "${FILES[@]}"; do cp -f "$SRC/$f.gz" .proxy_data/; done
echo "proxy_data: Fashion-MNIST in .proxy_data/" >&2
