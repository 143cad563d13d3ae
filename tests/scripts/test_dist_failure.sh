#!/usr/bin/env bash
# remat::dist failures on two MPI ranks: a rank that reports a failure makes the other fail with its
# message at once; a rank that never arrives makes the other give up at the timeout. Skipped (77)
# without mpirun or without MPI in the build.
set -uo pipefail
build=${1:-build}
command -v mpirun >/dev/null || { echo "no mpirun"; exit 77; }
alone=$("$build/tests/test_dist" 2>&1)
[ $? -eq 77 ] || { echo "$alone"; echo "test_dist should skip as one process"; exit 1; }
case "$alone" in *"built without MPI"*) echo "built without MPI"; exit 77 ;; esac
launch=(mpirun --allow-run-as-root --oversubscribe -np 2 "$build/tests/test_dist" --use-colour no)

start=$(date +%s)
out=$(timeout 120 "${launch[@]}" "[.rank-failure]" 2>&1)
status=$? seconds=$(( $(date +%s) - start ))
[ $status -ne 0 ] || { echo "$out"; echo "a failed rank: expected a non-zero exit"; exit 1; }
echo "$out" | grep -q "all_reduce on rank 0: rank 1 failed: out of memory on cpu" ||
  { echo "$out"; echo "a failed rank: rank 0 did not report rank 1's message"; exit 1; }
[ $seconds -lt 30 ] || { echo "a failed rank: took ${seconds} s"; exit 1; }

start=$(date +%s)
out=$(timeout 120 "${launch[@]}" "[.rank-stuck]" 2>&1)
status=$? stuck=$(( $(date +%s) - start ))
[ $status -ne 0 ] || { echo "$out"; echo "a stuck rank: expected a non-zero exit"; exit 1; }
echo "$out" | grep -q "all_reduce on rank 0 did not finish within 2 s" ||
  { echo "$out"; echo "a stuck rank: rank 0 did not give up with a clear error"; exit 1; }
[ $stuck -lt 15 ] || { echo "a stuck rank: took ${stuck} s (timeout 2 s)"; exit 1; }
echo "a failed rank's message reached rank 0 in ${seconds} s; a stuck rank was given up after 2 s (run ${stuck} s)"
