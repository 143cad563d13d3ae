"""f32 GEMM GFLOP/s of numpy's and PyTorch's BLAS at the shapes `remat-bench ops` compares.

The yardstick for remat's CPU GEMM (docs/results/cpu.md): run it beside `remat-bench ops`, with the
same thread count. numpy's OpenBLAS obeys OPENBLAS_CORETYPE as remat's does; run it once more with
the variable unset (`env -u OPENBLAS_CORETYPE ...`) to see the kernels the CPU itself would get.
"""
import argparse
import json
import os
import statistics
import time

SHAPES = [(1024, 1024, 1024), (1024, 256, 768), (1024, 256, 1024), (1024, 1024, 256)]


def median_gflops(matmul, a, b, m, k, n, repeats):
    matmul(a, b)  # warm-up: first-call allocations and thread start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b)
        times.append(time.perf_counter() - start)
    return 2.0 * m * k * n / statistics.median(times) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np  # after the thread variables, which the BLAS reads when it loads

    libraries = {"numpy": lambda a, b: a @ b}
    try:
        import torch

        torch.set_num_threads(args.threads)
        libraries["torch"] = lambda a, b: torch.mm(a, b)
    except ImportError:
        torch = None
    core = os.environ.get("OPENBLAS_CORETYPE", "unset")
    print(f"f32 GEMM, {args.threads} threads, median of {args.repeats}; OPENBLAS_CORETYPE={core}")
    print(f"{'shape (M x K x N)':>20} " + " ".join(f"{name:>10}" for name in libraries) + "   GFLOP/s")
    rows = []
    rng = np.random.default_rng(0)
    for m, k, n in SHAPES:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        row = {"m": m, "k": k, "n": n, "openblas_coretype": core}
        for name, matmul in libraries.items():
            x, y = (a, b) if name == "numpy" else (torch.from_numpy(a), torch.from_numpy(b))
            row[f"{name}_gflops"] = median_gflops(matmul, x, y, m, k, n, args.repeats)
        rows.append(row)
        print(f"{f'{m} x {k} x {n}':>20} " + " ".join(f"{row[f'{name}_gflops']:>10.1f}" for name in libraries))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
