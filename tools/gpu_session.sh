#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and no package access (the device tool's H100/H200): builds
# remat with CUDA from the carried .kit/ (tools/device_kit.sh makes it), runs the [cuda] suite and
# the GPU benchmarks, and leaves every log and JSON in $OUT (default runs/gpu).
#   bash tools/gpu_session.sh build   # configure and build only
#   bash tools/gpu_session.sh tests   # + the [cuda] suite
#   bash tools/gpu_session.sh all     # + remat-bench ops, gpt2 under none/full/ops/block_skip:2 in f32
#                                     #   and bf16, and the PyTorch peer on the same runs
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${OUT:-runs/gpu}
what=${1:-all}
logs=$root/runs/gpu-logs  # setup and build logs stay on the machine; their tails print on failure
mkdir -p "$out" "$logs"
# The device tool brings back at most 8 files: session.txt, test_cuda.txt and five JSON files.
exec > >(tee "$out/session.txt") 2>&1
step() { echo "== $* ($(date +%T))"; }

[ -d .kit ] || { echo "gpu_session: no .kit/ here: run tools/device_kit.sh and carry .kit"; exit 2; }
export PKG_CONFIG=$root/.kit/bin/pkg-config PKG_CONFIG_PATH=$root/.kit/pkgconfig PKG_CONFIG_LIBDIR=$root/.kit/pkgconfig
export LD_LIBRARY_PATH=$root/.kit/lib:${LD_LIBRARY_PATH:-}
{ nvidia-smi; nvcc --version; g++ --version | head -1; echo "meson $(meson --version)"; } > "$logs/machine.txt" 2>&1
head -14 "$logs/machine.txt"

# cuDNN: the toolkit's own, else the pip wheel's (nvidia-cudnn-cu13), given the unversioned
# libcudnn.so name the linker looks for.
cudnn_args=()
if ! ls /usr/local/cuda/lib64/libcudnn.so /usr/local/cuda/lib/libcudnn.so /usr/lib/x86_64-linux-gnu/libcudnn.so >/dev/null 2>&1; then
  wheel=$(python3 -c 'import nvidia.cudnn as m; print(list(m.__path__)[0])' 2>/dev/null || true)
  if [ -n "$wheel" ] && [ -d "$wheel/lib" ]; then
    mkdir -p /tmp/cudnn/lib
    ln -sfn "$wheel/include" /tmp/cudnn/include
    for f in "$wheel"/lib/libcudnn*.so*; do ln -sf "$f" /tmp/cudnn/lib/; done
    [ -e /tmp/cudnn/lib/libcudnn.so ] || ln -sf "$(ls "$wheel"/lib/libcudnn.so.* | head -1)" /tmp/cudnn/lib/libcudnn.so
    cudnn_args=(-Dcudnn_root=/tmp/cudnn)
    export LD_LIBRARY_PATH=$wheel/lib:$LD_LIBRARY_PATH
    echo "cuDNN from the pip wheel at $wheel"
  else
    echo "no cuDNN found: conv2d on cuda will report that it needs cuDNN"
  fi
fi

step configure
if [ ! -f build-gpu/build.ninja ]; then
  meson setup build-gpu -Dcuda=enabled -Dnative=false -Dgpu_arch=90 -Dcatch2_include="$root/.kit/include/catch2" \
    "${cudnn_args[@]}" > "$logs/setup.txt" 2>&1 || { tail -40 "$logs/setup.txt"; exit 1; }
fi
grep -A6 "^remat" "$logs/setup.txt" || true
step build
ninja -C build-gpu > "$logs/build.txt" 2>&1 || { grep -B2 -A12 -m5 "error" "$logs/build.txt"; exit 1; }
tail -1 "$logs/build.txt"
[ "$what" = build ] && exit 0

step "test_cuda"
build-gpu/tests/test_cuda --durations yes > "$out/test_cuda.txt" 2>&1
status=$?
grep -E "FAILED|failed|passed|REQUIRE|CHECK|with expansion|^  [a-z]" "$out/test_cuda.txt" | head -80
tail -4 "$out/test_cuda.txt"
[ "$what" = tests ] && exit $status

step "remat-bench ops"
build-gpu/bench/remat-bench ops --device cuda:0 --repeats 20 --json "$out/ops-gpu.json"
for dtype in f32 bf16; do
  step "remat-bench gpt2 none/full/ops in $dtype"
  build-gpu/bench/remat-bench --config gpt2 --policies none,full,ops,block_skip:2 --device cuda:0 --dtype $dtype \
    --steps 5 --warmup 2 --json "$out/bench-gpt2-$dtype.json"
  step "the PyTorch peer in $dtype"
  python3 bench/peer/gpt_peer.py --config gpt2 --device cuda --dtype $dtype --policies none,full,ops,block_skip:2 \
    --steps 5 --warmup 2 --json "$out/torch-gpt2-$dtype.json" &&
    python3 bench/peer/compare.py "$out/bench-gpt2-$dtype.json" "$out/torch-gpt2-$dtype.json"
done
exit $status
