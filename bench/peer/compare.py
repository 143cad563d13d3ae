#!/usr/bin/env python3
"""Prints remat / PyTorch ratios per policy from remat-bench's and the peer's JSON files."""
import json
import sys


def main():
    remat = {p["policy"]: p for p in json.load(open(sys.argv[1]))["policies"]}
    peer_doc = json.load(open(sys.argv[2]))
    peer = {p["policy"]: p for p in peer_doc["policies"]}
    print(f"remat vs PyTorch {peer_doc['torch']} (ratios < 1: remat is faster / leaner)")
    print(f"{'policy':<14} {'remat ms':>9} {'torch ms':>9} {'time ratio':>10} {'remat heap':>11} {'torch heap':>11} {'heap ratio':>10}")
    for name, r in remat.items():
        p = peer.get(name)
        if not p or not p.get("supported"):
            print(f"{name:<14} {r['median_step_ms']:>9.1f} {'n/a':>9} {'n/a':>10}   (PyTorch {peer_doc['torch']} cannot express it)")
            continue
        rh, ph = r.get("heap_step_peak_bytes"), p.get("heap_step_peak_bytes")
        if p.get("device_peak_bytes"):  # on a GPU: both sides' device allocator peaks over the step
            rh, ph = r.get("peak_bytes"), p["device_peak_bytes"]
        heap = f"{rh / 2**20:>10.1f}M {ph / 2**20:>10.1f}M {rh / ph:>10.2f}" if rh and ph else f"{'n/a':>11} {'n/a':>11} {'n/a':>10}"
        print(f"{name:<14} {r['median_step_ms']:>9.1f} {p['median_step_ms']:>9.1f} {r['median_step_ms'] / p['median_step_ms']:>10.2f} {heap}")


if __name__ == "__main__":
    main()
