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

# expect_failure WHAT TAG MESSAGE MAX_SECONDS: the hidden case TAG must fail, with MESSAGE from
# rank 0, within MAX_SECONDS; sets `seconds`.
expect_failure() {
  local what=$1 tag=$2 message=$3 max=$4 start out status
  start=$(date +%s)
  out=$(timeout 120 "${launch[@]}" "$tag" 2>&1)
  status=$? seconds=$(( $(date +%s) - start ))
  [ $status -ne 0 ] || { echo "$out"; echo "$what: expected a non-zero exit"; exit 1; }
  echo "$out" | grep -q "$message" || { echo "$out"; echo "$what: rank 0 did not report '$message'"; exit 1; }
  [ $seconds -lt "$max" ] || { echo "$what: took ${seconds} s"; exit 1; }
}

expect_failure "a failed rank" "[.rank-failure]" "all_reduce on rank 0: rank 1 failed: out of memory on cpu" 30
failed=$seconds
expect_failure "a stuck rank" "[.rank-stuck]" "all_reduce on rank 0 did not finish within 2 s" 15
echo "a failed rank's message reached rank 0 in ${failed} s; a stuck rank was given up after 2 s (run ${seconds} s)"
