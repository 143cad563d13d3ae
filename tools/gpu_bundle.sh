#!/usr/bin/env bash
# Builds, here, everything a GPU session runs (test_cuda, remat-bench and remat with libremat.so,
# its CUDA part libremat_cuda.so and the host libraries they need) into .gpu-bundle/, so that the
# GPU machine runs without building:
#   bash tools/gpu_bundle.sh            # then a device run with carry [".gpu-bundle"]:
#   OUT=$OUT bash tools/gpu_session.sh bundle
# The binaries keep the build tree's layout (tests/, bench/, models/ beside libremat.so.0), so their
# RUNPATH "$ORIGIN/.." finds libremat.so.0 and the bundled host libraries; libremat.so.0 loads
# libremat_cuda.so from beside itself, whose RUNPATH has the toolkit's lib64, and the session
# script puts the pip wheels' nvidia/*/lib folders on LD_LIBRARY_PATH for cuDNN and friends.
# Built for sm_90 without -march=native (the GPU machine's CPU is not this one), and with Eigen's
# GEMM rather than OpenBLAS (the GPU runs need no fast CPU GEMM, and the bundle stays small).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${GPU_BUNDLE_BUILD:-build-gpu-bundle}
bundle=.gpu-bundle

command -v nvcc >/dev/null || { echo "gpu_bundle: nvcc not found: the bundle needs the CUDA toolkit"; exit 77; }
# Without MPI: the GPU machine has no Open MPI, and remat and remat-bench link libremat_dist.
options=(-Dcuda=enabled -Dnative=false -Dgpu_arch=90 -Dblas=eigen -Dbuildtype=release -Dmpi=disabled)
# An incremental build: tools/meson_setup.sh gives nvcc header dependencies, so a changed header
# rebuilds every CUDA object that includes it (without them, stale objects would be bundled).
if [ ! -f "$build/build.ninja" ] || ! grep -q nvcc-depfile "$build/build.ninja"; then
  bash tools/meson_setup.sh "$build" "${options[@]}" >"$build.setup.log" 2>&1 || { tail -30 "$build.setup.log"; exit 1; }
else
  meson configure "$build" "${options[@]}" >"$build.setup.log" 2>&1 || { tail -30 "$build.setup.log"; exit 1; }
fi
ninja -C "$build" tests/test_cuda bench/remat-bench models/remat libremat_cuda.so | tail -1

rm -rf "$bundle"
mkdir -p "$bundle/tests" "$bundle/bench" "$bundle/models"
cp "$build/tests/test_cuda" "$bundle/tests/"
cp "$build/bench/remat-bench" "$bundle/bench/"
cp "$build/models/remat" "$bundle/models/"
cp -L "$build"/libremat.so.0 "$build"/libremat_dist.so.0 "$build"/libremat_cuda.so "$bundle/"
# Host libraries a machine without Debian's packages may lack, beside libremat.so.0. The C++ and
# OpenMP runtimes go to compat/: used only if the machine's own are missing or too old.
binaries=("$bundle"/tests/test_cuda "$bundle"/bench/remat-bench "$bundle"/models/remat "$bundle"/libremat.so.0 "$bundle"/libremat_dist.so.0 "$bundle"/libremat_cuda.so)
for binary in "${binaries[@]}"; do
  ldd "$binary"
done | awk '/=> \// {print $1, $3}' | sort -u | while read -r name path; do
  case "$name" in
    libfmt.so* | libpng16.so* | libz.so*) cp -L "$path" "$bundle/$name" ;;
    libstdc++.so* | libgcc_s.so* | libgomp.so*) mkdir -p "$bundle/compat" && cp -L "$path" "$bundle/compat/$name" ;;
  esac
done
# The newest glibc symbol version the binaries need (the GPU machine's glibc must be as new).
glibc=$(objdump -T "${binaries[@]}" |
  grep -o 'GLIBC_[0-9.]*' | sort -t. -k2,2n -k3,3n -u | tail -1)
git rev-parse --short HEAD > "$bundle/commit.txt" 2>/dev/null || echo unknown > "$bundle/commit.txt"
git status --porcelain --untracked-files=no | grep -q . && echo "(with uncommitted changes)" >> "$bundle/commit.txt"
echo "gpu_bundle: $(du -sh "$bundle" | cut -f1) in $bundle (commit $(head -1 "$bundle/commit.txt"); needs $glibc)"
