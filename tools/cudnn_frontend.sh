#!/usr/bin/env bash
# Fetches cuDNN's frontend (NVIDIA's header-only C++ API to cuDNN's graphs, MIT licence) for the
# CUDA backend's fused attention (kernels/cuda/attention_cudnn.cpp): the headers of one pinned
# release, taken from its PyPI wheel (the headers are the same in every wheel of a release) and
# checked against the wheel's SHA-256. Prints the include folder; exits non-zero, saying why on
# stderr, when it cannot (the build then goes on without cuDNN's attention).
#   bash tools/cudnn_frontend.sh        # -> ~/.cache/remat/cudnn-frontend-1.32.0/include
set -euo pipefail
version=1.32.0
wheel=nvidia_cudnn_frontend-$version-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
url=https://files.pythonhosted.org/packages/11/02/660e2dd9f9d9f940e1641443771730612c3aadaafbc5ef7a93cc313d519d/$wheel
sha256=c6006556017a4d1c914c52a556c71b1267f2d6a0500f742e7b4edef539878df0
dest=${REMAT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/remat}/cudnn-frontend-$version
if [ -f "$dest/include/cudnn_frontend.h" ]; then
  echo "$dest/include"
  exit 0
fi
mkdir -p "$(dirname "$dest")"
python3 - "$url" "$sha256" "$dest" "$version" <<'EOF'
import hashlib, io, os, shutil, sys, tempfile, urllib.request, zipfile
url, sha256, dest, version = sys.argv[1:]
try:
    data = urllib.request.urlopen(url, timeout=120).read()
except Exception as e:
    sys.exit(f"cudnn_frontend.sh: could not download {url}: {e}")
got = hashlib.sha256(data).hexdigest()
if got != sha256:
    sys.exit(f"cudnn_frontend.sh: {url} has SHA-256 {got}, expected {sha256}")
# Unpacked beside the destination and renamed into place: a folder that exists is complete.
work = tempfile.mkdtemp(dir=os.path.dirname(dest))
with zipfile.ZipFile(io.BytesIO(data)) as wheel:
    names = wheel.namelist()
    if "include/cudnn_frontend.h" not in names:
        sys.exit(f"cudnn_frontend.sh: {url} holds no include/cudnn_frontend.h")
    wheel.extractall(work, [n for n in names if n.startswith("include/")])
    with open(os.path.join(work, "LICENSE.txt"), "wb") as out:
        out.write(wheel.read(f"nvidia_cudnn_frontend-{version}.dist-info/licenses/LICENSE.txt"))
shutil.rmtree(dest, ignore_errors=True)
os.rename(work, dest)
EOF
echo "$dest/include"
