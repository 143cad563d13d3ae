#!/usr/bin/env bash
# A training step on a GPU queues its work without waiting for it: gpt tiny under every policy in
# f32 and bf16 on the emulated GPU (where nothing runs until the host waits), forward, backward,
# clipping and AdamW, with no host wait after each policy's first step (tests/host_enqueue.cpp).
# Skipped (77) where the emulated CUDA part is not built.
set -uo pipefail
build=${1:-build}
module=$build/tests/libremat_cuda_emulated.so
[ -f "$module" ] && [ -x "$build/tests/host_enqueue" ] || { echo "no emulated CUDA part in this build"; exit 77; }
module=$(cd "$(dirname "$module")" && pwd)/$(basename "$module")
for dtype in f32 bf16; do
  out=$(REMAT_CUDA_MODULE=$module timeout 120 "$build/tests/host_enqueue" tiny none,full,ops,block_skip:2,level:3 "$dtype" 2>&1)
  status=$?
  [ $status -eq 0 ] || { echo "$out"; echo "host_enqueue in $dtype: exit $status"; exit 1; }
  launches=$(echo "$out" | awk -F'|' '$2 ~ /none/ && $3 ~ /1/ {gsub(/ /, "", $5); print $5}')
done
echo "gpt tiny on the emulated GPU: ${launches} launches per step at none in bf16, no host wait after the first step under 5 policies in f32 and bf16"
