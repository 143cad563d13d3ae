#!/usr/bin/env bash
# The GPU procedure without a GPU: tools/gpu_bundle.sh builds the bundle, and tools/gpu_session.sh
# runs it end to end as a dry run (every [cuda] case its own process, exit 77 = skipped; the
# benchmarks on the cpu). Exit 0 pass, 77 skipped (no nvcc here), anything else a failure.
set -uo pipefail
cd "$(dirname "$0")/../.."
command -v nvcc >/dev/null || { echo "no nvcc: the GPU bundle cannot be built here"; exit 77; }
bash tools/gpu_bundle.sh || { echo "FAILED: tools/gpu_bundle.sh"; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
GPU_SESSION_DRY=1 OUT=$out bash tools/gpu_session.sh bundle > /dev/null 2>&1
rc=$?
fail() { echo "FAILED: $*"; echo "--- session.txt:"; tail -40 "$out/session.txt"; exit 1; }
[ $rc -eq 0 ] || fail "gpu_session.sh bundle exited $rc"
cases=$(.gpu-bundle/tests/test_cuda --list-test-names-only | grep -c .)
[ "$cases" -gt 0 ] || fail "test_cuda lists no test cases"
grep -q "^test_cuda: 0 passed, 0 failed, $cases skipped (one process per case)$" "$out/session.txt" ||
  fail "expected all $cases cases skipped, one process each"
[ "$(grep -c '^skipped in ' "$out/session.txt")" -eq "$cases" ] || fail "expected one 'skipped in' line per case"
grep -q "^ldd: every library found$" "$out/session.txt" || fail "the library check did not pass"
grep -q "^remat-bench: gpt tiny .*, fused loss) on cpu" "$out/session.txt" || fail "the fused-loss benchmark did not run"
[ "$(grep -cE "^gpu_session: REMAT_[A-Z_]+=[0-9a-z]+ (wins|does not win): none [0-9.]+ ms against the table's [0-9.]+ ms$" \
  "$out/session.txt")" -eq 5 ] || fail "expected each of the 5 settings weighed against the bf16 table's none step"
grep -q "^== remat-bench tiny none,full,ops,block_skip:2 in f32 on cpu with the settings that won: " "$out/session.txt" ||
  fail "the run with the settings that won did not run"
[ "$(grep -cE "^budget:(80|50)%: budget .* predicted .* measured " "$out/session.txt")" -eq 4 ] ||
  fail "expected the budget planner's two budgets with offload and without"
for f in session.txt test_cuda.txt failures.txt ops-gpu.json bench-gpt2-f32.json bench-gpt2-bf16.json; do
  [ -s "$out/$f" ] || [ "$f" = failures.txt ] || fail "$f missing or empty"
done
python3 - "$out" <<'PY' || fail "a JSON result does not parse or lacks its policies, profiles or rows"
import json, sys
d = sys.argv[1]
for name in ("bench-gpt2-f32.json", "bench-gpt2-bf16.json"):
    doc = json.load(open(f"{d}/{name}"))
    got = [p["policy"] for p in doc["policies"]]
    assert got == ["none", "full", "ops", "block_skip:2"], got
    assert all(p["grads_bitwise_equal"] for p in doc["policies"])
    # --profile: every policy's traced step by op and phase, largest first; no host waits on a CPU.
    for p in doc["policies"]:
        ms = [row["ms"] for row in p["profile"]]
        assert ms and ms == sorted(ms, reverse=True), (p["policy"], ms)
        assert {row["phase"] for row in p["profile"]} >= {"forward", "backward"}, p["policy"]
        assert p["host_syncs_per_step"] is None, p["host_syncs_per_step"]
    assert any(row["phase"] == "replay" for row in doc["policies"][1]["profile"])  # full replays
ops = json.load(open(f"{d}/ops-gpu.json"))
assert any("multi-tensor" in row["op"] for row in ops["rows"])
PY
[ "$(ls "$out" | wc -l)" -le 8 ] || fail "more than the 8 files the device tool brings back"
echo "gpu bundle built ($(du -sh .gpu-bundle | cut -f1)) and the session ran dry: $cases cases skipped, benchmarks written"
