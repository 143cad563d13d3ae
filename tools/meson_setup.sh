#!/usr/bin/env bash
# `meson setup` for a build folder, with Meson running nvcc through tools/nvcc-depfile so that a
# changed header rebuilds the CUDA objects that include it (see that script). Sets up a new
# folder; sets up again (wiping it) a folder whose CUDA objects were compiled without header
# dependencies; leaves any other folder as it is (change its options with `meson configure`).
#   bash tools/meson_setup.sh BUILD [meson options...]
set -euo pipefail
build=$1
shift
root=$(cd "$(dirname "$0")/.." && pwd)
native=$build.native.ini  # beside the folder, like its setup log; Meson reads it again on regeneration
printf "[binaries]\ncuda = '%s'\n" "$root/tools/nvcc-depfile" >"$native"
if [ -f "$build/build.ninja" ]; then
  if grep -q "^rule cuda_COMPILER" "$build/build.ninja" && ! grep -q "nvcc-depfile" "$build/build.ninja"; then
    echo "meson_setup: $build compiles CUDA without header dependencies: setting it up again"
    exec meson setup --wipe "$build" --native-file "$native" "$@"
  fi
  exit 0
fi
exec meson setup "$build" --native-file "$native" "$@"
