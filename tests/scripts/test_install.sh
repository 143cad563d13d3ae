#!/usr/bin/env bash
# The installed library as a user meets it: `meson install` into a temporary prefix, then the
# examples built against that copy through pkg-config and through CMake, with a decoy
# runtime/tensor.h first on the include path; the public headers under -Wall -Wextra -Wpedantic
# -Werror with g++ and clang++; and libremat.so loading where CUDA's libraries cannot be found.
# Usage: test_install.sh BUILD_DIR. Exit 0 passed, 77 skipped, anything else failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
build=$(cd "${1:-build}" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAILED: $*"; exit 1; }
log=$tmp/log.txt
run() { "$@" >> "$log" 2>&1 || { tail -30 "$log"; fail "$*"; }; }

run meson install -C "$build" --destdir "$tmp/root" --no-rebuild
prefix=$tmp/root$(meson introspect "$build" --buildoptions | python3 -c 'import json,sys; print(next(o["value"] for o in json.load(sys.stdin) if o["name"] == "prefix"))')
pc=$(find "$prefix" -name remat.pc | head -1)
[ -n "$pc" ] || fail "no remat.pc installed under $prefix"
libdir=$(dirname "$(dirname "$pc")")
export PKG_CONFIG_PATH=$(dirname "$pc")
[ "$(pkg-config --variable=prefix remat)" -ef "$prefix" ] || fail "pkg-config's prefix $(pkg-config --variable=prefix remat) is not $prefix"
[ -f "$prefix/include/remat/remat.h" ] || fail "no include/remat/remat.h"
[ ! -e "$prefix/include/remat/models/tasks.h" ] || fail "an internal header (models/tasks.h) is installed"

# A user's own runtime/tensor.h early on the include path must not be picked up by remat's headers.
mkdir -p "$tmp/decoy/runtime"
echo '#error "the decoy runtime/tensor.h was included"' > "$tmp/decoy/runtime/tensor.h"
strict=(-std=c++20 -Wall -Wextra -Wpedantic -Werror)
for cxx in g++ clang++; do
  if command -v $cxx >/dev/null; then
    run $cxx "${strict[@]}" -I"$tmp/decoy" $(pkg-config --cflags remat) -fsyntax-only tests/install/strict_headers.cpp
  else
    fail "$cxx is not installed (make deps installs it)"
  fi
done

# The examples through pkg-config, run from the installed copy.
mkdir -p "$tmp/pc"
for example in checkpoint_sweep custom_op train_resume; do
  run g++ "${strict[@]}" -O2 -I"$tmp/decoy" examples/$example.cpp -o "$tmp/pc/$example" \
    $(pkg-config --cflags --libs remat) -Wl,-rpath,"$libdir"
done
(cd "$tmp/pc" && run ./checkpoint_sweep && run ./custom_op && run ./train_resume "$tmp/pc/run") || exit 1
grep -q "every policy gave the gradients of none, bit for bit" "$log" || fail "checkpoint_sweep did not confirm its gradients"
grep -q "ends bit for bit equal to" "$log" || fail "train_resume did not resume bit for bit"

# The same examples through the CMake package.
run cmake -S examples -B "$tmp/cmake" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CXX_FLAGS="-Wall -Wextra -Wpedantic -Werror -I$tmp/decoy" -DCMAKE_BUILD_RPATH="$libdir"
run cmake --build "$tmp/cmake" -j 2
(cd "$tmp/cmake" && run ./checkpoint_sweep && run ./custom_op && run ./train_resume "$tmp/cmake/run") || exit 1

# libremat.so itself needs no CUDA library; where CUDA's libraries cannot be loaded (the dynamic
# loader without its cache sees only the system folders), the CPU works and a GPU request says why.
so=$(readlink -f "$libdir/libremat.so")
if readelf -d "$so" | grep -E "NEEDED.*(cudart|cublas|cudnn|nccl)"; then fail "libremat.so needs a CUDA library"; fi
run g++ -std=c++20 -O1 tests/install/cuda_probe.cpp -o "$tmp/cuda_probe" $(pkg-config --cflags --libs remat) -Wl,-rpath,"$libdir"
loader=$(readelf -l "$tmp/cuda_probe" | sed -n 's/.*interpreter: \(.*\)]/\1/p')
if ! "$loader" --inhibit-cache --library-path "$libdir" "$tmp/cuda_probe" >> "$log" 2>&1; then
  # CUDA's libraries sit in a system folder here: take the module away instead.
  REMAT_CUDA_MODULE=$tmp/absent/libremat_cuda.so "$tmp/cuda_probe" >> "$log" 2>&1 || { tail -5 "$log"; fail "cuda_probe"; }
fi
echo "installed into a temporary prefix; 3 examples built and run through pkg-config and CMake, headers clean with g++ and clang++, libremat.so loads without CUDA ($(grep -m1 '^cuda: built' "$log"))"
