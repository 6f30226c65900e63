#!/usr/bin/env bash
# Copy Fashion-MNIST (Debian package dataset-fashion-mnist) into .proxy_data/ (gitignored) so the
# GPU machine can get it via run's carry: [".proxy_data"]. Used by benchmarks/proxy/train_image_proxy.py.
#   sudo apt-get install -y dataset-fashion-mnist   # installs /usr/share/datasets/fashion-mnist/*.gz (30 MB)
#   bash scripts/proxy_data.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if [ ! -f "$SRC/train-images-idx3-ubyte.gz" ]; then
  echo "missing $SRC: apt-get install dataset-fashion-mnist (or set FASHION_MNIST_DIR)" >&2; exit 1
fi
mkdir -p .proxy_data
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  cp -f "$SRC/$f.gz" .proxy_data/
done
ls -l .proxy_data
