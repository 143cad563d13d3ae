#!/usr/bin/env python3
"""Runs every Catch2 test binary and prints one closing line: N passed, N failed, N skipped.

Counts test cases over all binaries. A binary that exits 77 (the CUDA suite without a GPU)
counts all its test cases as skipped. Extra arguments are passed to each binary as a test
filter (default: everything not tagged [slow]). With the default filter, the script tests in
tests/scripts/ run too (unless --no-scripts), each one case given the build folder: exit 0
passed, 77 skipped, anything else failed.
"""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = ["test_install.sh", "test_bench.sh", "test_gpu_bundle.sh", "test_host_enqueue.sh", "test_dist_failure.sh", "test_dist_train.sh"]
BINARIES = ["test_runtime", "test_ops", "test_gradcheck", "test_autograd", "test_checkpoint", "test_policy", "test_train", "test_schedule", "test_diffusion", "test_library", "test_graphs", "test_reliability", "test_cli", "test_dist", "test_simt", "test_cuda_host", "test_cudnn_graphs", "test_cuda"]
# Binaries a build makes only with some dependency: absent, they count as one skipped case.
OPTIONAL = {"test_simt": "built only with the CUDA toolkit (its headers)",
            "test_cuda_host": "built only with the CUDA toolkit (its headers)",
            "test_cudnn_graphs": "built only with cuDNN and its frontend"}
# Binaries run on several MPI ranks (rank 0 reports): launched by mpirun when there is one, else alone
# (they then exit 77, skipped). --allow-run-as-root: CI runs as root; --oversubscribe: 2 ranks on any
# number of cores.
MPI_RANKS = {"test_dist": 2}


def count_listed(binary, test_filter):
    out = subprocess.run([binary, "--list-test-names-only", test_filter], capture_output=True, text=True).stdout
    return len([line for line in out.splitlines() if line.strip()])


def run_binary(label, command, case_filter, env=None):
    """Runs one Catch2 binary and prints a line; returns its (passed, failed, skipped) test cases and exit code."""
    start = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.time() - start
    out = proc.stdout + proc.stderr
    binary = next(c for c in command if "/tests/" in c)
    if proc.returncode == 77:
        n = count_listed(binary, case_filter)
        lines = out.strip().splitlines()
        reason = next((l for l in lines if "skipping" in l), lines[-1] if lines else "exit 77")
        print(f"{label}: {n} skipped ({reason})", flush=True)
        return 0, 0, n, 77
    all_passed = re.search(r"All tests passed \(\d+ assertions? in (\d+) test cases?\)", out)
    summary = re.search(r"test cases:\s*(\d+)\s*\|\s*(\d+) passed\s*\|\s*(\d+) failed", out)
    only_failed = re.search(r"test cases:\s*(\d+)\s*\|\s*(\d+) failed", out)
    if all_passed and proc.returncode == 0:
        p, f = int(all_passed.group(1)), 0
    elif summary:
        p, f = int(summary.group(2)), int(summary.group(3))
    elif only_failed:
        p, f = 0, int(only_failed.group(2))
    elif "No tests ran" in out and proc.returncode in (0, 2):
        p, f = 0, 0
    else:
        p, f = 0, 1  # crashed before Catch2 could report
    if f or proc.returncode != 0:
        sys.stdout.write(out)
    print(f"{label}: {p} passed, {f} failed ({seconds:.1f} s)", flush=True)
    return p, f, 0, proc.returncode


def main():
    args = [a for a in sys.argv[1:] if a != "--no-scripts"]
    run_scripts = "--no-scripts" not in sys.argv[1:]
    build = Path(args[0] if len(args) > 0 else "build")
    test_filter = args[1] if len(args) > 1 else "~[slow]"
    # Hidden cases ([.name]) belong to the scripts that run them (they fail on purpose); without
    # this, a filter of exclusions alone would select them.
    case_filter = test_filter + "~[.]"
    passed = failed = skipped = 0
    gpu_skipped = False
    for name in BINARIES:
        binary = build / "tests" / name
        if not binary.exists() and name in OPTIONAL:
            print(f"{name}: 1 skipped ({OPTIONAL[name]})", flush=True)
            skipped += 1
            continue
        if not binary.exists():
            print(f"{name}: not built", flush=True)
            failed += 1
            continue
        command = [str(binary), case_filter]
        if name in MPI_RANKS and shutil.which("mpirun"):
            command = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(MPI_RANKS[name])] + command
            command += ["--use-colour", "no"]
        p, f, s, rc = run_binary(name, command, case_filter)
        passed, failed, skipped = passed + p, failed + f, skipped + s
        gpu_skipped = gpu_skipped or (name == "test_cuda" and rc == 77)
    # Without a GPU, the [cuda] suite again on the emulated CUDA part (tests/simt_launch.h): remat's
    # CUDA sources with their kernels under the SIMT emulator, and the module's one-rank NCCL in
    # place of libnccl. Cases at a GPU's scale ([large], minutes each there) run in `make
    # test-slow`; [gpu-only] ones (2e9 threads) need a GPU.
    emulated = build / "tests" / "libremat_cuda_emulated.so"
    if gpu_skipped and emulated.exists():
        scale = "[large]" if test_filter == "[slow]" else case_filter + "~[large]"
        module = str(emulated.resolve())
        env = dict(os.environ, REMAT_CUDA_MODULE=module, REMAT_NCCL_LIBRARY=module)
        command = [str(build / "tests" / "test_cuda"), scale + "~[gpu-only]"]
        p, f, s, _ = run_binary("test_cuda (emulated GPU)", command, command[1], env)
        passed, failed, skipped = passed + p, failed + f, skipped + s
    if test_filter == "~[slow]" and run_scripts:
        for name in SCRIPTS:
            start = time.time()
            proc = subprocess.run(["bash", str(Path(__file__).parent.parent / "tests" / "scripts" / name), str(build)],
                                  capture_output=True, text=True)
            seconds = time.time() - start
            out = (proc.stdout + proc.stderr).strip()
            last = out.splitlines()[-1] if out else ""
            if proc.returncode == 77:
                skipped += 1
                print(f"{name}: skipped ({last})", flush=True)
            elif proc.returncode == 0:
                passed += 1
                print(f"{name}: passed ({seconds:.1f} s): {last}", flush=True)
            else:
                failed += 1
                sys.stdout.write(out + "\n")
                print(f"{name}: FAILED, exit {proc.returncode} ({seconds:.1f} s)", flush=True)
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
