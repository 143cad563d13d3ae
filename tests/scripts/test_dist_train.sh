#!/usr/bin/env bash
# `mpirun -np 2 remat train`: an interrupted run resumed (with ZeRO-1) ends with the same
# model.safetensors and losses as one that ran through; rank 0 alone prints; resuming with another
# number of processes is a clear error. Skipped (77) without mpirun or without MPI in the build.
set -uo pipefail
build=${1:-build}
remat="$build/models/remat"
command -v mpirun >/dev/null || { echo "no mpirun"; exit 77; }
"$build/tests/test_dist" 2>&1 | grep -q "built without MPI" && { echo "built without MPI"; exit 77; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
two=(timeout 300 mpirun --allow-run-as-root --oversubscribe -np 2 -x OMP_NUM_THREADS=1 "$remat" train)
args=(--config tiny --batch 4 --dropout 0.1 --steps 30 --save-every 10 --policy full --seed 3)

out=$("${two[@]}" "${args[@]}" --out "$dir/through" 2>&1) || { echo "$out"; echo "the 2-rank run failed"; exit 1; }
[ "$(echo "$out" | grep -c '^final loss')" -eq 1 ] || { echo "$out"; echo "expected one 'final loss' line (rank 0's)"; exit 1; }
echo "$out" | grep -q "data parallel on 2 processes" || { echo "$out"; echo "no data parallel line"; exit 1; }
"${two[@]}" "${args[@]}" --out "$dir/resumed" --stop-at 17 >/dev/null 2>&1 || { echo "the interrupted run failed"; exit 1; }
out=$("${two[@]}" --resume "$dir/resumed" --zero 1 2>&1) || { echo "$out"; echo "the resumed run failed"; exit 1; }
cmp "$dir/through/model.safetensors" "$dir/resumed/model.safetensors" ||
  { echo "resumed under ZeRO-1: model.safetensors differs from the run that went through"; exit 1; }
losses() { python3 -c 'import json,sys; print([json.loads(l)["loss"] for l in open(sys.argv[1])])' "$1"; }
[ "$(losses "$dir/through/metrics.jsonl")" = "$(losses "$dir/resumed/metrics.jsonl")" ] ||
  { echo "the losses in metrics.jsonl differ"; exit 1; }

out=$("$remat" train --resume "$dir/resumed" --steps 40 2>&1)
status=$?
[ $status -eq 2 ] || { echo "$out"; echo "resuming a 2-rank run in one process: expected exit 2, got $status"; exit 1; }
echo "$out" | grep -q "the run trained on 2 processes" || { echo "$out"; echo "unclear error"; exit 1; }
echo "2 ranks: stopped at 17, resumed with --zero 1: model.safetensors and 30 losses bit for bit; one process refused"
