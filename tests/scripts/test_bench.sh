#!/usr/bin/env bash
# remat-bench as a user runs it: gpt tiny under none, full and a budget in one pass and in two
# micro-batches, with --json; every policy's gradients bitwise equal to none's, checkpointing
# happening (ops replayed, activation peak below none's), the micro-batch halving the activation
# peak, the floor matching the measured peak, the budget's predicted recompute and the place of its
# predicted peak reported, nothing offloaded on the CPU; `remat-bench twin` writing every
# parameter with its gradient, the inputs and the loss for each model (as many parameters as the
# bench's JSON counts for gpt); and a bad --micro-batches, `ops --attention` or twin model one line
# and exit 2.
set -uo pipefail
build=${1:-build}
bench=$build/bench/remat-bench
[ -x "$bench" ] || { echo "no remat-bench in $build"; exit 77; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for n in 1 2; do
  out=$(timeout 120 "$bench" --config tiny --policies none,full,budget:50% --steps 2 --warmup 1 --micro-batches $n \
        --json "$dir/bench$n.json" 2>&1)
  status=$?
  [ $status -eq 0 ] || { echo "$out"; echo "remat-bench --micro-batches $n: exit $status"; exit 1; }
done
for model in gpt dit unet; do
  out=$(timeout 120 "$bench" twin --model $model --config tiny --out "$dir/twin-$model.safetensors" 2>&1)
  status=$?
  [ $status -eq 0 ] || { echo "$out"; echo "remat-bench twin --model $model: exit $status"; exit 1; }
done
python3 - "$dir" <<'PY' || exit 1
import json, sys
runs = {n: json.load(open(f"{sys.argv[1]}/bench{n}.json")) for n in (1, 2)}
def by_policy(run):
    return {p["policy"]: p for p in run["policies"]}
failures = []
def check(ok, what):
    if not ok: failures.append(what)
for n, run in runs.items():
    check(run["run"]["micro_batches"] == n, f"run.micro_batches {run['run']['micro_batches']} at {n}")
    p = by_policy(run)
    for name, r in p.items():
        check(r["grads_bitwise_equal"], f"{name} at {n} micro-batches: gradients differ from none's")
    for name in ("full", "budget:50%"):
        check(p[name]["ops_replayed"] > 0, f"{name} at {n}: nothing replayed")
        check(p[name]["activation_peak_bytes"] < p["none"]["activation_peak_bytes"], f"{name} at {n}: no memory saved")
    for name in ("none", "full"):
        check(abs(p[name]["activation_peak_bytes"] - p[name]["activation_floor_bytes"]) <= 1024,
              f"{name} at {n}: peak {p[name]['activation_peak_bytes']} vs floor {p[name]['activation_floor_bytes']}")
    b = p["budget:50%"]
    check(b["activation_peak_bytes"] <= b["budget_bytes"], f"budget:50% at {n}: peak above its budget")
    check(b["predicted_recompute_ms"] is not None and b["predicted_recompute_ms"] > 0,
          f"budget:50% at {n}: predicted recompute {b['predicted_recompute_ms']}")
    check(p["none"]["predicted_recompute_ms"] is None, "none: a predicted recompute")
    # On the CPU nothing is offloaded: the plan says so, and the step moved nothing.
    check(b["predicted_offloaded_bytes"] == 0 and b["predicted_transfer_ms"] == 0 and b["offloaded_bytes"] == 0,
          f"budget:50% at {n}: offload on the cpu ({b['predicted_offloaded_bytes']}, {b['offloaded_bytes']})")
    check(p["none"]["predicted_offloaded_bytes"] is None, "none: a predicted offload")
    check(b["predicted_peak_at"].startswith("blocks.") or b["predicted_peak_at"] in
          ("before the blocks", "the head, the loss and backward"),
          f"budget:50% at {n}: predicted peak at {b['predicted_peak_at']!r}")
for model, inputs in (("gpt", {"idx", "targets"}), ("dit", {"x_t", "t", "labels", "target"}),
                      ("unet", {"x_t", "t", "labels", "target"})):
    with open(f"{sys.argv[1]}/twin-{model}.safetensors", "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    names = {n for n in header if n != "__metadata__"}
    params = {n[6:] for n in names if n.startswith("param.")}
    check(params and params == {n[5:] for n in names if n.startswith("grad.")},
          f"twin {model}: parameters and gradients differ")
    check({n[6:] for n in names if n.startswith("input.")} == inputs, f"twin {model}: inputs {sorted(names)}")
    check(header["output.loss"]["dtype"] == "F64" and header["param." + sorted(params)[0]]["dtype"] == "F64",
          f"twin {model}: not f64")
    if model == "gpt":
        count = 0
        for n in params:
            numel = 1
            for d in header["param." + n]["shape"]:
                numel *= d
            count += numel
        bench_count = runs[1]["run"]["parameters"]
        check(count == bench_count, f"twin gpt: {count} parameters, the bench {bench_count}")
one, two = by_policy(runs[1])["none"]["activation_peak_bytes"], by_policy(runs[2])["none"]["activation_peak_bytes"]
check(two * 2 <= one + 1024, f"none: activation peak {two} in 2 micro-batches, {one} in one")
if failures:
    print("\n".join(failures)); sys.exit(1)
print(f"none's activation peak {one} bytes in one pass, {two} in two micro-batches; full and budget:50% bitwise")
PY
out=$(timeout 60 "$bench" --config tiny --micro-batches 3 2>&1)
status=$?
[ $status -eq 2 ] && [ "$(echo "$out" | wc -l)" -eq 1 ] && echo "$out" | grep -q "divides the batch" ||
  { echo "$out"; echo "--micro-batches 3 on a batch of 2: expected one line and exit 2, got exit $status"; exit 1; }
out=$(timeout 60 "$bench" ops --attention mma,flash 2>&1)
status=$?
[ $status -eq 2 ] && [ "$(echo "$out" | wc -l)" -eq 1 ] && echo "$out" | grep -q "flash not in" ||
  { echo "$out"; echo "remat-bench ops --attention mma,flash: expected one line and exit 2, got exit $status"; exit 1; }
out=$(timeout 60 "$bench" twin --model vit --out "$dir/x.safetensors" 2>&1)
status=$?
[ $status -eq 2 ] && [ "$(echo "$out" | wc -l)" -eq 1 ] && echo "$out" | grep -q "expected --model gpt, dit or unet" ||
  { echo "$out"; echo "remat-bench twin --model vit: expected one line and exit 2, got exit $status"; exit 1; }
echo "gpt tiny: remat-bench --micro-batches 1 and 2 and twin checked;" \
  "a bad count, attention path or model is one line and exit 2"
