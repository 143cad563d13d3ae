// REMAT_LAUNCH(grid, block, shared_bytes, kernel)(args...): a kernel launch. With nvcc it is the
// launch syntax; under the SIMT emulator (REMAT_SIMT_EMULATION, tests/simt_launch.h) it queues the
// kernel on the emulated device's compute stream, so that the host code around every launch can run
// on a CPU (the emulated CUDA part, tests/meson.build).
#pragma once

#ifdef REMAT_SIMT_EMULATION
#define REMAT_LAUNCH(grid, block, shared_bytes, ...) ::remat_simt::launcher(grid, block, shared_bytes, __VA_ARGS__)
#else
#define REMAT_LAUNCH(grid, block, shared_bytes, ...) __VA_ARGS__<<<grid, block, shared_bytes>>>
#endif
