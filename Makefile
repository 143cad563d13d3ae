# The front door: `make train` and `make test` work on a fresh Debian 12 machine (as root or with sudo).
BUILD ?= build
PACKAGES := g++ pkg-config python3 meson ninja-build libeigen3-dev catch2 libcli11-dev nlohmann-json3-dev libfmt-dev libpng-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
JOBS ?= $(shell nproc)

TRAIN_STEPS ?= 200

.PHONY: all deps build test test-slow train bench clean

all: build

# Installs only the Debian packages that are missing.
deps:
	@missing=$$(for p in $(PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

$(BUILD)/build.ninja:
	meson setup $(BUILD)

build: deps $(BUILD)/build.ninja
	ninja -C $(BUILD) -j $(JOBS)

test: build
	python3 tools/run_tests.py $(BUILD) '~[slow]'

test-slow: build
	python3 tools/run_tests.py $(BUILD) '[slow]'

# The reference GPT (small config) on CPU with full activation checkpointing.
train: build
	$(BUILD)/models/remat train --model gpt --config small --policy full --steps $(TRAIN_STEPS) --device cpu --seed 0 --out runs/train

bench: build
	$(BUILD)/bench/remat-bench ops --device cpu

clean:
	rm -rf $(BUILD)
