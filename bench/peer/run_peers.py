#!/usr/bin/env python3
"""remat against its peers, PyTorch 2.x and JAX, on the same model: interleaved rounds (remat, then
PyTorch, then JAX, again and again, so that a slow spell of the machine hits all three), each side
under the same LD_PRELOAD heap tracker. `--model gpt` (the default) runs bench/peer/gpt_peer.py and
gpt_jax.py; `--model dit` and `--model unet` run bench/peer/diffusion_peer.py (PyTorch only). First
the PyTorch twin must compute remat's function (`remat-bench twin`, then the peer's `--check`: one
f64 step, the loss and every gradient compared), and every round the two sides must report the same
parameter count, or the run stops: they would not be the same model. Prints, per policy, the median
over the rounds of each side's median step time, the spread over the rounds (min..max), the heap
peak, and the ratios remat / peer (below 1: remat is faster or leaner). Then, from the same rounds, the f32 GEMM at
1024^3 and gpt small's shapes: every library of remat's (`remat-bench ops`) against numpy's and
PyTorch's BLAS (bench/peer/gemm_peer.py), and numpy once more with OPENBLAS_CORETYPE unset when the
environment sets it. Writes every round's JSON and summary.json.

  python3 bench/peer/run_peers.py --build build --python ~/.cache/remat-peer/venv/bin/python --rounds 3
  python3 bench/peer/run_peers.py --model dit --no-gemm --python ~/.cache/remat-peer/venv/bin/python
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def run(cmd, env):
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
    sys.stdout.write(proc.stdout[-3000:])
    if proc.returncode != 0:
        sys.stdout.write(proc.stderr[-3000:])
        raise SystemExit(f"run_peers: {cmd[0]} exited {proc.returncode}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default="build")
    ap.add_argument("--python", default=sys.executable, help="a Python with torch (and jax) installed")
    ap.add_argument("--model", default="gpt", choices=["gpt", "dit", "unet"])
    ap.add_argument("--config", default="small")
    ap.add_argument("--policies", default="none,full,ops,block_skip:2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="runs/bench/peer")
    ap.add_argument("--no-gemm", action="store_true", help="skip the GEMM comparison")
    args = ap.parse_args()
    build = Path(args.build).resolve()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, LD_PRELOAD=str(build / "bench" / "libheap_tracker.so"), OMP_NUM_THREADS=str(args.threads))
    have_jax = args.model == "gpt" and subprocess.run([args.python, "-c", "import jax"],
                                                      capture_output=True).returncode == 0
    common = ["--config", args.config, "--policies", args.policies, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    peers = ["torch"] + (["jax"] if have_jax else [])
    torch_peer = (["bench/peer/gpt_peer.py"] if args.model == "gpt"
                  else ["bench/peer/diffusion_peer.py", "--model", args.model])
    # The twin must compute remat's function before the two are timed: one f64 step, compared.
    twin = str(out / "twin.safetensors")
    bench = str(build / "bench" / "remat-bench")
    run([bench, "twin", "--model", args.model, "--config", args.config, "--out", twin], env)
    run([args.python, *torch_peer, "--config", args.config, "--check", twin], env)
    for r in range(args.rounds):
        print(f"== round {r + 1} of {args.rounds}", flush=True)
        run([bench, "--model", args.model, *common, "--json", str(out / f"remat-{r}.json")], env)
        run([args.python, *torch_peer, *common, "--threads", str(args.threads), "--json", str(out / f"torch-{r}.json")],
            env)
        check_same_model(out / f"remat-{r}.json", out / f"torch-{r}.json")
        if have_jax:
            run([args.python, "bench/peer/gpt_jax.py", *common, "--threads", str(args.threads),
                 "--json", str(out / f"jax-{r}.json")], env)
        if not args.no_gemm:
            plain = {k: v for k, v in env.items() if k != "LD_PRELOAD"}
            run([str(build / "bench" / "remat-bench"), "ops", "--json", str(out / f"remat-ops-{r}.json")], plain)
            run([args.python, "bench/peer/gemm_peer.py", "--threads", str(args.threads),
                 "--json", str(out / f"gemm-{r}.json")], plain)
            if "OPENBLAS_CORETYPE" in plain:
                unset = {k: v for k, v in plain.items() if k != "OPENBLAS_CORETYPE"}
                run([args.python, "bench/peer/gemm_peer.py", "--threads", str(args.threads),
                     "--json", str(out / f"gemm-unset-{r}.json")], unset)

    def rounds_of(side):
        docs = [json.load(open(out / f"{side}-{r}.json")) for r in range(args.rounds)]
        by_policy = {}
        for doc in docs:
            for p in doc["policies"]:
                if p.get("supported", True):
                    by_policy.setdefault(p["policy"], []).append(p)
        return docs[0], by_policy

    _, remat = rounds_of("remat")
    versions = {}
    sides = {"remat": remat}
    for peer in peers:
        doc, rows = rounds_of(peer)
        sides[peer] = rows
        versions[peer] = doc.get(peer if peer == "jax" else "torch")
    summary = {"model": args.model, "config": args.config, "rounds": args.rounds, "steps": args.steps,
               "threads": args.threads, "peers": versions, "policies": []}
    head = f"{'policy':<13} {'remat ms':>17}"
    for peer in peers:
        head += f" {peer + ' ms':>17} {'ratio':>6}"
    head += f" {'remat heap':>11}"
    for peer in peers:
        head += f" {peer + ' heap':>11} {'ratio':>6}"
    print(f"\nremat vs " + ", ".join(f"{p} {v}" for p, v in versions.items()) +
          f": {args.model} {args.config}, {args.threads} threads, median of {args.rounds} interleaved rounds (min..max)")
    print(head)
    for policy in args.policies.split(","):
        entry = {"policy": policy}
        line = f"{policy:<13}"
        for side in ["remat"] + peers:
            rows = sides[side].get(policy)
            if not rows:
                entry[side] = None
                continue
            times = [row["median_step_ms"] for row in rows]
            heaps = [row.get("heap_step_peak_bytes") or 0 for row in rows]
            entry[side] = {"median_step_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
                           "heap_step_peak_bytes": statistics.median(heaps)}
        def cell(side):
            e = entry.get(side)
            return f"{e['median_step_ms']:7.1f} ({e['min_ms']:.0f}..{e['max_ms']:.0f})" if e else f"{'n/a':>17}"
        line += f" {cell('remat'):>17}"
        for peer in peers:
            ratio = entry[peer] and entry["remat"] and entry["remat"]["median_step_ms"] / entry[peer]["median_step_ms"]
            entry[f"time_ratio_{peer}"] = ratio
            line += f" {cell(peer):>17} {ratio:6.2f}" if ratio else f" {cell(peer):>17} {'n/a':>6}"
        rh = entry["remat"]["heap_step_peak_bytes"] if entry["remat"] else 0
        line += f" {rh / 2**20:10.1f}M"
        for peer in peers:
            ph = entry[peer]["heap_step_peak_bytes"] if entry[peer] else 0
            ratio = rh / ph if rh and ph else None
            entry[f"heap_ratio_{peer}"] = ratio
            line += f" {ph / 2**20:10.1f}M {ratio:6.2f}" if ratio else f" {'n/a':>11} {'n/a':>6}"
        print(line)
        summary["policies"].append(entry)
    if not args.no_gemm:
        summary["gemm"] = summarize_gemm(out, args.rounds, args.threads)
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\nper-round JSON and summary.json in {out}")


def check_same_model(remat_json, peer_json):
    """Stops the run unless both sides built a model of the same parameter count."""
    mine = json.load(open(remat_json))["run"].get("parameters")
    theirs = json.load(open(peer_json)).get("parameters")
    if mine != theirs:
        raise SystemExit(f"run_peers: remat's model has {mine} parameters and the peer's {theirs}: not the same model")


def summarize_gemm(out, rounds, threads):
    """Per shape: the median over the rounds of every library's GFLOP/s, and remat's chosen library
    over the best of the others (at or above 1: remat's GEMM is as fast as the best measured)."""
    by_shape = {}
    chosen = None

    def add(shape, library, gflops):
        by_shape.setdefault(shape, {}).setdefault(library, []).append(gflops)

    for r in range(rounds):
        for row in json.load(open(out / f"remat-ops-{r}.json"))["rows"]:
            if row.get("op") != "cpu gemm libraries":
                continue
            chosen = row["chosen"]
            for key, value in row.items():
                if key.endswith("_gflops"):
                    add((row["m"], row["k"], row["n"]), "remat " + key[: -len("_gflops")], value)
        for name, label in (("gemm", ""), ("gemm-unset", " (coretype unset)")):
            path = out / f"{name}-{r}.json"
            if path.exists():
                for row in json.load(open(path)):
                    for key, value in row.items():
                        if key.endswith("_gflops"):
                            add((row["m"], row["k"], row["n"]), key[: -len("_gflops")] + label, value)
    if not by_shape:
        return None
    libraries = list(next(iter(by_shape.values())).keys())
    print(f"\nf32 GEMM, GFLOP/s, {threads} threads, median of {rounds} rounds (remat chooses {chosen})")
    print(f"{'M x K x N':<18}" + "".join(f" {lib:>24}" for lib in libraries) + f" {'ratio':>6}")
    rows = []
    for (m, k, n), libs in by_shape.items():
        medians = {lib: statistics.median(values) for lib, values in libs.items()}
        mine = medians.get("remat " + chosen) if chosen else None
        others = [v for lib, v in medians.items() if not lib.startswith("remat ")]
        ratio = mine / max(others) if mine and others else None
        rows.append({"m": m, "k": k, "n": n, "gflops": medians, "ratio_to_best_peer": ratio})
        print(f"{f'{m} x {k} x {n}':<18}" + "".join(f" {medians.get(lib, 0):24.1f}" for lib in libraries) +
              (f" {ratio:6.2f}" if ratio else f" {'n/a':>6}"))
    return {"chosen": chosen, "shapes": rows}


if __name__ == "__main__":
    main()
