# The front door: `make train` and `make test` work on a fresh Debian 12 machine (as root or with sudo).
SHELL := /bin/bash
BUILD ?= build
PACKAGES := gcc g++ clang libclang-rt-14-dev libomp-dev cmake pkg-config python3 meson ninja-build libeigen3-dev libopenblas-openmp-dev catch2 libcli11-dev nlohmann-json3-dev libfmt-dev libpng-dev libopenmpi-dev openmpi-bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
JOBS ?= $(shell nproc)

TRAIN_STEPS ?= 200

.PHONY: all deps build test test-slow test-asan test-tsan fuzz train bench bench-ops bench-peer clean

all: build

# Installs only the Debian packages that are missing.
deps:
	@missing=$$(for p in $(PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

# tools/meson_setup.sh: nvcc with header dependencies (and a folder set up without them set up again).
build: deps
	bash tools/meson_setup.sh $(BUILD)
	ninja -C $(BUILD) -j $(JOBS)

test: build
	python3 tools/run_tests.py $(BUILD) '~[slow]'

test-slow: build
	python3 tools/run_tests.py $(BUILD) '[slow]'

# The whole CPU suite under AddressSanitizer + UndefinedBehaviorSanitizer with leak detection (a
# CPU-only build of its own); any report fails it. CI runs it after `make test`.
SAN_OPTIONS := ASAN_OPTIONS=detect_leaks=1:halt_on_error=1:abort_on_error=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
test-asan: deps
	@[ -f build-asan/build.ninja ] || meson setup build-asan -Dmpi=disabled -Db_sanitize=address,undefined -Dcuda=disabled \
	  -Dnative=false -Dbuildtype=debugoptimized -Db_lundef=false
	ninja -C build-asan -j $(JOBS)
	$(SAN_OPTIONS) python3 tools/run_tests.py build-asan '~[slow]' --no-scripts

# libFuzzer on the safetensors reader, the policy strings and the command line's numbers and names
# (tests/fuzz), FUZZ_SECONDS each (or FUZZ_RUNS executions each, with FUZZ_SECONDS=0), starting from
# the committed seed corpora; new inputs go to a temporary folder. A clang build of its own with
# AddressSanitizer and UndefinedBehaviorSanitizer.
FUZZ_SECONDS ?= 60
FUZZ_RUNS ?= -1
FUZZ_TARGETS := safetensors policy config
fuzz: deps
	@[ -f build-fuzz/build.ninja ] || CC=clang CXX=clang++ meson setup build-fuzz -Dmpi=disabled -Dfuzz=true -Dtests=false \
	  -Dcuda=disabled -Dnative=false -Dblas=eigen -Db_sanitize=address,undefined -Db_lundef=false \
	  -Dbuildtype=debugoptimized -Dcpp_args="-fsanitize=fuzzer-no-link -Wno-pass-failed"
	ninja -C build-fuzz -j $(JOBS) $(addprefix tests/fuzz/fuzz_,$(FUZZ_TARGETS))
	@mkdir -p build-fuzz/crashes; for t in $(FUZZ_TARGETS); do \
	  work=$$(mktemp -d); echo "== fuzz_$$t for $(FUZZ_SECONDS) s (0: no limit), $(FUZZ_RUNS) runs (-1: no limit)"; \
	  UBSAN_OPTIONS=halt_on_error=1 build-fuzz/tests/fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -runs=$(FUZZ_RUNS) -print_final_stats=1 \
	    -rss_limit_mb=4096 -artifact_prefix=build-fuzz/crashes/ $$work tests/fuzz/corpus/$$t >$$work.log 2>&1; \
	  status=$$?; grep -E "stat::number_of_executed_units|Done" $$work.log; \
	  [ $$status -eq 0 ] || { tail -n 60 $$work.log; echo "fuzz_$$t failed; the input is in build-fuzz/crashes/"; }; \
	  rm -rf $$work $$work.log; [ $$status -eq 0 ] || exit 1; \
	done

# The threading tests under ThreadSanitizer (a CPU-only build of its own; OpenMP kept to one thread,
# since libgomp is not instrumented). Fails on any report.
test-tsan: deps
	@[ -f build-tsan/build.ninja ] || meson setup build-tsan -Dmpi=disabled -Db_sanitize=thread -Dcuda=disabled -Dnative=false \
	  -Dbuildtype=debugoptimized -Db_lundef=false
	ninja -C build-tsan -j $(JOBS) tests/test_graphs
	OMP_NUM_THREADS=1 TSAN_OPTIONS="halt_on_error=1 exitcode=66" build-tsan/tests/test_graphs '[threads]'

# The reference GPT (small config) on CPU with full activation checkpointing.
train: build
	mkdir -p runs
	$(BUILD)/models/remat train --model gpt --config small --policy full --steps $(TRAIN_STEPS) --device cpu --seed 0 --out runs/train

# Every policy on gpt small: table on stdout, JSON/CSV/trace/plot in runs/bench.
bench: build
	mkdir -p runs/bench
	$(BUILD)/bench/remat-bench --model gpt --config small --policies none,full,ops,block_skip:2,level:3 \
	  --device cpu --steps 5 --warmup 1 --json runs/bench/bench.json --csv runs/bench/bench.csv \
	  --trace runs/bench/trace.json --plot runs/bench/plot.svg

bench-ops: build
	$(BUILD)/bench/remat-bench ops --device cpu

# remat against PyTorch 2.x and JAX from PyPI (a venv in the cache folder, outside the repo: about
# 6 GB, most of it the CUDA wheels torch brings), interleaved rounds under the same heap tracker,
# after an f64 step that shows the PyTorch twin computes remat's model. PEER_MODEL=dit or unet
# compares those (PyTorch only).
# Without PyPI it falls back to Debian's python3-torch (1.13: no fused attention, no selective
# checkpointing) and no JAX.
PEER_VENV ?= $(HOME)/.cache/remat-peer/venv
PEER_ROUNDS ?= 3
PEER_MODEL ?= gpt
bench-peer: build
	@if [ ! -x $(PEER_VENV)/bin/python ] || ! $(PEER_VENV)/bin/python -c 'import torch' 2>/dev/null; then \
	  echo "installing torch and jax from PyPI into $(PEER_VENV) (about 6 GB)"; \
	  python3 -m venv $(PEER_VENV) && $(PEER_VENV)/bin/pip install -q torch numpy jax || \
	  { echo "no PyPI: falling back to Debian's python3-torch"; rm -rf $(PEER_VENV); \
	    $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-torch libopenblas0-pthread; }; \
	fi
	python3 bench/peer/run_peers.py --build $(BUILD) --model $(PEER_MODEL) --rounds $(PEER_ROUNDS) --out runs/bench/peer-$(PEER_MODEL) \
	  --python $$( [ -x $(PEER_VENV)/bin/python ] && echo $(PEER_VENV)/bin/python || echo /usr/bin/python3 )

clean:
	rm -rf $(BUILD)
