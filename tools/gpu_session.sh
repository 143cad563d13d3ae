#!/usr/bin/env bash
# The GPU procedure: one device call that runs the [cuda] suite case by case and the GPU
# benchmarks, writing everything to $OUT (default runs/gpu) as it goes. Time-boxed: every step runs
# under `timeout`, and steps that no longer fit in GPU_SESSION_BUDGET seconds (default 400) are
# skipped and named.
#   bash tools/gpu_session.sh bundle   # run the prebuilt .gpu-bundle/ (tools/gpu_bundle.sh): no build
#   bash tools/gpu_session.sh all      # fallback: build from the carried .kit/ (tools/device_kit.sh), then run
#   bash tools/gpu_session.sh build    # fallback: build only
# Without a GPU (or with GPU_SESSION_DRY=1) it is a dry run: every test case exits 77 (skipped) and
# the benchmarks run gpt tiny on the CPU, which exercises the whole path but the GPU itself.
# $OUT gets at most 8 files (what the device tool brings back): session.txt (all output),
# test_cuda.txt, failures.txt, ops-gpu.json, bench-gpt2-{f32,bf16}.json, torch-gpt2-{f32,bf16}.json.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${OUT:-runs/gpu}
what=${1:-bundle}
budget=${GPU_SESSION_BUDGET:-400}
mkdir -p "$out"
exec > >(tee "$out/session.txt") 2>&1
start=$SECONDS
step() { echo "== $* (+$((SECONDS - start)) s)"; }
# Seconds left for a step that may take up to $1 seconds; 0 when it does not fit.
fits() { [ $((budget - (SECONDS - start))) -ge "$1" ]; }

dry=${GPU_SESSION_DRY:-}
if [ -z "$dry" ] && ! nvidia-smi -L >/dev/null 2>&1; then dry=1; fi
if [ -n "$dry" ]; then
  echo "gpu_session: dry run (no GPU): test cases skip, benchmarks run gpt tiny on the cpu"
else
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi
echo "host: $(uname -m), $(nproc) cores, $(ldd --version | head -1)"

# CUDA libraries: the toolkit's, then the pip wheels' (nvidia-cudnn-cu13, nvidia-nccl-cu13 and the
# ones torch brings) ahead of the RUNPATH.
cuda_lib=""
if command -v nvcc >/dev/null; then cuda_lib=$(cd "$(dirname "$(command -v nvcc)")/.." && pwd)/lib64; fi
wheel_libs=$(python3 - 2>/dev/null <<'EOF'
import os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
print(":".join(os.path.join(r, d, "lib") for r in roots for d in sorted(os.listdir(r))
               if os.path.isdir(os.path.join(r, d, "lib"))))
EOF
)
export LD_LIBRARY_PATH=${cuda_lib:+$cuda_lib:}${wheel_libs:+$wheel_libs:}${LD_LIBRARY_PATH:-}

case "$what" in
  bundle)
    bin=$root/.gpu-bundle
    [ -x "$bin/tests/test_cuda" ] || { echo "gpu_session: no .gpu-bundle/ here: run tools/gpu_bundle.sh and carry .gpu-bundle"; exit 2; }
    echo "bundle: commit $(tr '\n' ' ' < "$bin/commit.txt")"
    # Every library resolves, or the session stops here and names what is missing.
    missing() {
      for b in "$bin"/tests/test_cuda "$bin"/bench/remat-bench "$bin"/models/remat "$bin"/libremat.so.0 "$bin"/libremat_dist.so.0 "$bin"/libremat_cuda.so; do
        ldd "$b" 2>&1 | grep -E "not found" | sed "s|^|$(basename "$b"): |"
      done
    }
    problems=$(missing)
    if [ -n "$problems" ] && [ -d "$bin/compat" ]; then
      echo "ldd: $(echo "$problems" | wc -l) problem(s); retrying with the bundled C++/OpenMP runtimes"
      export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$bin/compat
      problems=$(missing)
    fi
    if [ -n "$problems" ]; then
      echo "$problems"
      echo "gpu_session: libraries missing (above); LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
      echo "gpu_session: fall back to building here: bash tools/gpu_session.sh all (carry .kit)"
      exit 3
    fi
    echo "ldd: every library found"
    # Which cuDNN runs (its kernels and its deterministic attention backward vary by version).
    ldd "$bin/libremat_cuda.so" | grep -E "libcudnn|libcublas\." | sed 's/^[[:space:]]*/cuda library: /'
    ;;
  build | tests | all)
    # The fallback: build on the GPU machine from the carried .kit/ (its build-time dependencies).
    logs=$root/runs/gpu-logs
    mkdir -p "$logs"
    [ -d .kit ] || { echo "gpu_session: no .kit/ here: run tools/device_kit.sh and carry .kit"; exit 2; }
    export PKG_CONFIG=$root/.kit/bin/pkg-config PKG_CONFIG_PATH=$root/.kit/pkgconfig PKG_CONFIG_LIBDIR=$root/.kit/pkgconfig
    export LD_LIBRARY_PATH=$root/.kit/lib:$LD_LIBRARY_PATH
    cudnn_args=()
    wheel=$(python3 -c 'import nvidia.cudnn as m; print(list(m.__path__)[0])' 2>/dev/null || true)
    if [ -n "$wheel" ] && [ -d "$wheel/lib" ]; then cudnn_args=(-Dcudnn_root="$wheel"); fi
    step configure
    if [ ! -f build-gpu/build.ninja ]; then
      bash tools/meson_setup.sh build-gpu -Dcuda=enabled -Dnative=false -Dgpu_arch=90 -Dcatch2_include="$root/.kit/include/catch2" \
        "${cudnn_args[@]}" > "$logs/setup.txt" 2>&1 || { tail -40 "$logs/setup.txt"; exit 1; }
    fi
    step build
    ninja -C build-gpu tests/test_cuda bench/remat-bench models/remat libremat_cuda.so > "$logs/build.txt" 2>&1 ||
      { grep -B2 -A12 -m5 "error" "$logs/build.txt"; exit 1; }
    tail -1 "$logs/build.txt"
    [ "$what" = build ] && exit 0
    bin=$root/build-gpu
    ;;
  *) echo "gpu_session: unknown mode '$what': expected bundle, all, tests or build"; exit 2 ;;
esac

# ---- the [cuda] suite, one process per test case: a sticky kernel fault cannot hide the rest ----
step "test_cuda, case by case"
passed=0 failed=0 skipped=0 failures=() passes=()
: > "$out/test_cuda.txt"
: > "$out/failures.txt"
mapfile -t cases < <("$bin/tests/test_cuda" --list-test-names-only | grep -v '^$')
for name in "${cases[@]}"; do
  spec=$(printf '%s' "$name" | sed 's/[],[*\\]/\\&/g')  # Catch2: , [ ] * and \ are special
  if ! fits 30; then
    echo "SKIPPED (out of time): $name" | tee -a "$out/test_cuda.txt"
    skipped=$((skipped + 1))
    continue
  fi
  t0=$SECONDS
  { echo "---- $name"; timeout 150 "$bin/tests/test_cuda" "$spec" --durations yes; } >> "$out/test_cuda.txt" 2>&1
  rc=$?
  case $rc in
    0) passed=$((passed + 1)); verdict=passed; passes+=("$name") ;;
    77) if [ -n "$dry" ]; then skipped=$((skipped + 1)); verdict=skipped
        else  # a GPU is here, so a skip means remat could not reach it
          failed=$((failed + 1)); verdict="FAILED (skipped on a GPU machine: $(tail -1 "$out/test_cuda.txt"))"; failures+=("$name")
        fi ;;
    124) failed=$((failed + 1)); verdict="FAILED (timeout 150 s)"; failures+=("$name") ;;
    *) failed=$((failed + 1)); verdict="FAILED (exit $rc)"; failures+=("$name") ;;
  esac
  echo "$verdict in $((SECONDS - t0)) s: $name"
done
echo "test_cuda: ${passed} passed, ${failed} failed, ${skipped} skipped (one process per case)"

# A failed case again, synchronously (the failing launch names itself) and under memcheck, with the
# caching allocator off so that memcheck sees each tensor's bounds (REMAT_CUDA_CACHING=0).
sanitizer=$(command -v compute-sanitizer || echo "${cuda_lib%/lib64}/bin/compute-sanitizer")
for name in "${failures[@]}"; do
  spec=$(printf '%s' "$name" | sed 's/[],[*\\]/\\&/g')
  if fits 60; then
    step "rerun with CUDA_LAUNCH_BLOCKING=1: $name"
    { echo "---- CUDA_LAUNCH_BLOCKING=1: $name"; CUDA_LAUNCH_BLOCKING=1 timeout 150 "$bin/tests/test_cuda" "$spec"; } \
      >> "$out/failures.txt" 2>&1
    grep -E "FAILED|REQUIRE|CHECK|with expansion|error|Error" "$out/failures.txt" | tail -12
  fi
  if [ -x "$sanitizer" ] && fits 120; then
    step "compute-sanitizer memcheck: $name"
    { echo "---- compute-sanitizer --tool memcheck: $name"
      REMAT_CUDA_CACHING=0 timeout 240 "$sanitizer" --tool memcheck --print-limit 20 "$bin/tests/test_cuda" "$spec"
    } >> "$out/failures.txt" 2>&1
    grep -E "ERROR SUMMARY|Invalid|out of bounds" "$out/failures.txt" | tail -8
  fi
done

# The benchmarks fall back to the reference index checks on the host if the GPU's own failed, and
# take only attention paths and linear's bias epilogue whose cases passed: the defaults (`auto`:
# mma in bf16, the GEMMs in f32; the epilogue on) when the cases of both passed, else what did.
attention=flash bias_epilogue=0 bias_grad_ok=0 fused_loss=0 mma_ok=0 gemm_ok=0 cudnn_ok=0 copies_ok=0 offload_ok=0
for name in "${failures[@]}"; do
  case $name in
    "indices checked on the GPU"*)
      export REMAT_CUDA_INDEX_CHECK=host
      echo "gpu_session: benchmarks with REMAT_CUDA_INDEX_CHECK=host (the device index checks failed)" ;;
  esac
done
for name in "${passes[@]}"; do
  case $name in
    "attention on the tensor cores (mma)"*) mma_ok=1 ;;
    "attention through cuBLAS GEMMs"*) gemm_ok=1 ;;
    "attention on cuDNN's fused SDPA"*) cudnn_ok=1 ;;
    "linear's bias in cuBLASLt's epilogue"*) bias_epilogue=1 ;;
    "linear's dW and db from one cuBLASLt call"*) bias_grad_ok=1 ;;
    "linear_cross_entropy on cuda"*) fused_loss=1 ;;
    "autocast's weight copies on cuda"*) copies_ok=1 ;;
    "the budget planner offloads on cuda"*) offload_ok=1 ;;
  esac
done
case $mma_ok$gemm_ok in
  11) attention=auto ;;
  10) attention=mma ;;
  01) attention=gemm ;;
esac
[ "$attention" = auto ] || echo "gpu_session: benchmarks with the attention path $attention (a tensor-core path's case did not pass)"
[ "$bias_epilogue" = 1 ] || echo "gpu_session: benchmarks with linear's bias by its own kernel (the epilogue case did not pass)"
[ -n "$dry" ] || export REMAT_CUDA_ATTENTION=$attention REMAT_CUDA_BIAS_EPILOGUE=$bias_epilogue
# autocast's kept weight copies are on by default; off (a cast at every use) if their case failed.
if [ -z "$dry" ] && [ "$copies_ok" = 0 ]; then
  export REMAT_AUTOCAST_CACHE=0
  echo "gpu_session: benchmarks with REMAT_AUTOCAST_CACHE=0 (the weight copies' case did not pass)"
fi
echo "gpu_session: attention path for the benchmarks: ${REMAT_CUDA_ATTENTION:-auto}," \
  "linear's bias in cuBLASLt's epilogue: ${REMAT_CUDA_BIAS_EPILOGUE:-1}"

# ---- benchmarks: kernels, gpt2 under four policies in f32 and bf16, and the PyTorch peer ----------
if [ -n "$dry" ]; then device=cpu peer_device=cpu config=tiny steps=1 warmup=0; else device=cuda:0 peer_device=cuda config=gpt2 steps=5 warmup=2; fi
policies=none,full,ops,block_skip:2
bf16=bf16  # the dtype of the bf16 runs: f32 in the dry run, as bf16 compute is GPU-only
[ -n "$dry" ] && bf16=f32
have_torch=$(python3 -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
if fits 60; then
  # Only the attention paths whose cases passed: a path that crashes would take the JSON with it.
  paths=()
  [ "$mma_ok" = 1 ] && paths+=(mma mma-1tile)
  [ "$gemm_ok" = 1 ] && paths+=(gemm)
  [ "$cudnn_ok" = 1 ] && paths+=(cudnn)
  [ ${#paths[@]} -gt 0 ] || paths=(none)
  step "remat-bench ops on $device (attention: ${paths[*]})"
  timeout 120 "$bin/bench/remat-bench" ops --device "$device" --repeats $([ -n "$dry" ] && echo 1 || echo 20) \
    --attention "$(IFS=,; echo "${paths[*]}")" --json "$out/ops-gpu.json" | tail -40
else
  echo "SKIPPED (out of time): remat-bench ops"
fi
# remat-bench's table of the four policies in $1 (bf16 or f32), then the PyTorch peer's.
bench_table() {
  local dtype=$1 bench_dtype=$1
  [ "$dtype" = bf16 ] && bench_dtype=$bf16
  if fits 90; then
    step "remat-bench $config $policies in $bench_dtype on $device"
    timeout 240 "$bin/bench/remat-bench" --config "$config" --policies "$policies" --device "$device" \
      --dtype "$bench_dtype" --steps "$steps" --warmup "$warmup" --profile --json "$out/bench-gpt2-$dtype.json"
    echo "remat-bench exit $?"
  else
    echo "SKIPPED (out of time): remat-bench in $dtype"
  fi
  if [ -z "$have_torch" ]; then
    echo "SKIPPED: the PyTorch peer in $dtype (no torch on this machine)"
  elif fits 90; then
    step "the PyTorch $have_torch peer in $bench_dtype on $peer_device"
    timeout 240 python3 bench/peer/gpt_peer.py --config "$config" --device "$peer_device" --dtype "$bench_dtype" \
      --policies "$policies" --steps "$steps" --warmup "$warmup" --json "$out/torch-gpt2-$dtype.json" &&
      python3 bench/peer/compare.py "$out/bench-gpt2-$dtype.json" "$out/torch-gpt2-$dtype.json"
  else
    echo "SKIPPED (out of time): the PyTorch peer in $dtype"
  fi
}
# bf16 first: #20's targets are bf16's; f32 comes after the settings below are weighed.
bench_table bf16
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
winners=()
none_ms() {  # the median `none` step (ms) in a remat-bench JSON file; nothing if it has none
  python3 -c 'import json, sys
print(next(p["median_step_ms"] for p in json.load(open(sys.argv[1]))["policies"] if p["policy"] == "none"))' \
    "$1" 2>/dev/null
}
# The bf16 `none` step (or the policies given fourth) once more with one setting changed
# (`VAR=value`), if `ok` is 1 and time allows: what that setting is worth against the bf16 table.
# A setting whose `none` step is at least 2% faster than the table's (run to run, steps moved by
# about 1.5% in session 25) wins: the run below takes every winner at once. The dry run takes
# each (gpt tiny on the cpu, where the settings change nothing).
bench_none_with() {
  local setting=$1 ok=$2 what=$3 policies=${4:-none} ms base
  [ -n "$dry" ] && ok=1
  if [ "$ok" = 1 ] && fits 60; then
    step "remat-bench $config $policies in $bf16 on $device, $what"
    rm -f "$scratch/with.json"
    env "$setting" timeout 120 "$bin/bench/remat-bench" --config "$config" --policies "$policies" \
      --device "$device" --dtype "$bf16" --steps "$steps" --warmup "$warmup" --json "$scratch/with.json"
    echo "remat-bench exit $?"
    ms=$(none_ms "$scratch/with.json") base=$(none_ms "$out/bench-gpt2-bf16.json")
    if [ -n "$ms" ] && [ -n "$base" ] && awk -v a="$ms" -v b="$base" 'BEGIN { exit !(a < 0.98 * b) }'; then
      winners+=("$setting")
      echo "gpu_session: $setting wins: none $ms ms against the table's $base ms"
    else
      echo "gpu_session: $setting does not win: none ${ms:-?} ms against the table's ${base:-?} ms"
    fi
  else
    echo "SKIPPED (its case did not pass, or out of time): remat-bench with $what"
  fi
}
# The mma kernels with one row tile a warp instead of two (remat-bench ops times both kernels
# alone; this is the whole step): if it is faster, make it the default (kDefaultRowTiles in
# kernels/cuda/attention_mma_kernels.cuh; the bits are the same).
bench_none_with REMAT_CUDA_MMA_TILES=1 "$mma_ok" "mma attention with one row tile a warp"
# cuDNN's fused attention (deterministic backward) in place of the mma kernels: if it is faster,
# make it `auto`'s choice where it applies (automatic_path in kernels/cuda/attention.cu).
bench_none_with REMAT_CUDA_ATTENTION=cudnn "$cudnn_ok" "attention on cuDNN's fused SDPA" none,full
# What autocast's kept weight copies are worth (146 cast launches a gpt2 step, 236 MiB more at the
# peak): a cast at every use, against the bf16 table. If the copies are slower, make them opt-in
# (g_enabled's fallback in autograd/cast_cache.cpp).
bench_none_with REMAT_AUTOCAST_CACHE=0 "$copies_ok" "a cast of each weight at every use" none,full
# What the bias epilogue is worth: linear's bias by its own kernel.
bench_none_with REMAT_CUDA_BIAS_EPILOGUE=0 "$bias_epilogue" "linear's bias by its own kernel"
# What taking db from dW's GEMM (cuBLASLt's BGRADB, off by default) is worth: if it is faster, make it
# the default (REMAT_CUDA_BIAS_GRAD_EPILOGUE's fallback in runtime/cuda_runtime.cpp).
bench_none_with REMAT_CUDA_BIAS_GRAD_EPILOGUE=1 "$bias_grad_ok" "linear's dW and db from one cuBLASLt call"
# The bf16 table once more with every setting that won above, against the PyTorch peer's bf16 run
# (#20's targets): if it is faster than the first table, make those settings the defaults (each
# setting's comment above says where). The dry run takes it whatever won.
if { [ -n "$dry" ] || [ ${#winners[@]} -gt 0 ]; } && fits 90; then
  step "remat-bench $config $policies in $bf16 on $device with the settings that won: ${winners[*]:-none}"
  env "${winners[@]}" timeout 240 "$bin/bench/remat-bench" --config "$config" --policies "$policies" \
    --device "$device" --dtype "$bf16" --steps "$steps" --warmup "$warmup" --json "$scratch/best.json"
  echo "remat-bench exit $?"
  [ -s "$out/torch-gpt2-bf16.json" ] && [ -s "$scratch/best.json" ] &&
    python3 bench/peer/compare.py "$scratch/best.json" "$out/torch-gpt2-bf16.json"
else
  echo "SKIPPED (no setting won, or out of time): remat-bench with the settings that won"
fi
bench_table f32
# What the fused head and loss cost and save: none and full in bf16 with --fused-loss, against the
# bf16 table above (its case must have passed; the dry run takes the path on the cpu).
if { [ -n "$dry" ] || [ "$fused_loss" = 1 ]; } && fits 75; then
  step "remat-bench $config none,full in $bf16 on $device, the head and loss fused"
  timeout 150 "$bin/bench/remat-bench" --config "$config" --policies none,full --device "$device" \
    --dtype "$bf16" --steps "$steps" --warmup "$warmup" --fused-loss
  echo "remat-bench exit $?"
else
  echo "SKIPPED (its case did not pass, or out of time): remat-bench with the head and loss fused"
fi
# The other attention paths against the bf16 table's, in bf16 (where auto takes mma; not mma when its
# case failed: its numbers would mean nothing); the tables go to session.txt only ($OUT holds at
# most 8 files).
for other in flash gemm; do
  [ "$other" = "$attention" ] && continue
  [ "$other" = gemm ] && [ "$gemm_ok" = 0 ] && continue
  if [ -z "$dry" ] && fits 75; then
    step "remat-bench $config none,full in bf16 on $device, attention path $other"
    REMAT_CUDA_ATTENTION=$other timeout 150 "$bin/bench/remat-bench" --config "$config" --policies none,full \
      --device "$device" --dtype bf16 --steps "$steps" --warmup "$warmup" --profile
    echo "remat-bench exit $?"
  else
    echo "SKIPPED (dry run or out of time): remat-bench with the attention path $other"
  fi
done
# The budget planner in bf16: offload where the block's compute hides the transfer (the default on
# a GPU; its case must have passed), then recompute alone, each against none in the same run (gpt
# tiny's floor lies at 47% of its peak).
budgets=budget:50%,budget:30%
[ -n "$dry" ] && budgets=budget:80%,budget:50%
for offload in 1 0; do
  if [ "$offload" = 1 ] && [ -z "$dry" ] && [ "$offload_ok" = 0 ]; then
    echo "SKIPPED (its case did not pass): remat-bench budgets with offload"
  elif fits 75; then
    step "remat-bench $config none,$budgets in $bf16 on $device, REMAT_OFFLOAD=$offload"
    REMAT_OFFLOAD=$offload timeout 150 "$bin/bench/remat-bench" --config "$config" --policies "none,$budgets" \
      --device "$device" --dtype "$bf16" --steps "$steps" --warmup "$warmup"
    echo "remat-bench exit $?"
  else
    echo "SKIPPED (out of time): remat-bench budgets with REMAT_OFFLOAD=$offload"
  fi
done
step "done: test_cuda ${passed} passed, ${failed} failed, ${skipped} skipped"
[ "$failed" -eq 0 ]
