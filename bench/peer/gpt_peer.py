#!/usr/bin/env python3
"""The PyTorch peer of remat-bench: the same GPT (architecture, sizes, init scheme, batch shape,
threads) under the checkpoint policies PyTorch can express, printing the same fields.

Run it under the heap tracker (bench/peer/heap_tracker.c, LD_PRELOAD) to get heap peaks measured
exactly as remat's are: `make bench-peer` does both sides and prints the ratios.
"""
import argparse
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from peer_common import HAS_SAC, apply_policy, check_twin, heap_tracker, policy_row, time_steps, write_json

CONFIGS = {
    "tiny": dict(vocab=64, channels=32, heads=4, layers=2, seq_len=16, batch=2),
    "small": dict(vocab=256, channels=256, heads=8, layers=6, seq_len=128, batch=8),
    "gpt2": dict(vocab=50304, channels=768, heads=12, layers=12, seq_len=1024, batch=8),
}
HAS_SDPA = hasattr(F, "scaled_dot_product_attention")


class Block(nn.Module):
    def __init__(self, c, heads, dropout, layers):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.fc, self.mlp_proj = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        for lin in (self.qkv, self.fc):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        for lin in (self.proj, self.mlp_proj):  # GPT-2: residual projections scaled by 1/sqrt(2 L)
            nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * layers))
            nn.init.zeros_(lin.bias)

    def attention(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (m.view(b, t, self.heads, c // self.heads).transpose(1, 2) for m in (q, k, v))
        if HAS_SDPA:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # PyTorch < 2.0 has no fused attention: the T x T matrix is materialised
            s = (q @ k.transpose(-1, -2)) / math.sqrt(c // self.heads)
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            y = s.masked_fill(mask, float("-inf")).softmax(-1) @ v
        return y.transpose(1, 2).reshape(b, t, c)

    def forward(self, x):
        h = x + F.dropout(self.proj(self.attention(self.ln1(x))), self.dropout, self.training)
        m = self.mlp_proj(F.gelu(self.fc(self.ln2(h)), approximate="tanh"))
        return h + F.dropout(m, self.dropout, self.training)


class Gpt(nn.Module):
    def __init__(self, cfg, dropout):
        super().__init__()
        c = cfg["channels"]
        self.dropout = dropout
        self.wte, self.wpe = nn.Embedding(cfg["vocab"], c), nn.Embedding(cfg["seq_len"], c)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(c, cfg["heads"], dropout, cfg["layers"]) for _ in range(cfg["layers"]))
        self.ln_f = nn.LayerNorm(c)

    def forward(self, idx, targets):
        t = idx.shape[1]
        h = F.dropout(self.wte(idx) + self.wpe(torch.arange(t, device=idx.device)), self.dropout, self.training)
        for block in self.blocks:
            h = block(h)
        logits = self.ln_f(h) @ self.wte.weight.t()  # tied head
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


# remat's names (models/gpt.cpp) of the parameters named otherwise here.
REMAT_NAMES = {"qkv": "attn.qkv", "proj": "attn.proj", "fc": "mlp.fc", "mlp_proj": "mlp.proj"}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="small", choices=sorted(CONFIGS))
    ap.add_argument("--policies", default="none,full,ops,block_skip:2,level:3")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (memory then from torch.cuda's counters)")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"], help="bf16: torch.autocast, f32 weights")
    ap.add_argument("--json", default="")
    ap.add_argument("--check", default="", metavar="FILE",
                    help="instead of timing: compare the twin in f64 with `remat-bench twin --model gpt`'s FILE")
    args = ap.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu:  # the same numerics as remat's f32: no TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.config]
    if args.check:
        check_twin(Gpt(cfg, 0.0).double().train(), lambda m, i: m(i["idx"], i["targets"]), args.check, REMAT_NAMES)
        return
    tracker = heap_tracker()
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 13, (cfg["batch"], cfg["seq_len"]), generator=gen).to(device)
    targets = torch.randint(0, 13, (cfg["batch"], cfg["seq_len"]), generator=gen).to(device)
    rows = []
    print(f"pytorch {torch.__version__} peer: gpt {args.config} on {device} in {args.dtype}, {args.threads} threads, "
          f"fused attention {'yes' if HAS_SDPA else 'no'}, selective checkpointing {'yes' if HAS_SAC else 'no'}")
    for policy in args.policies.split(","):
        torch.manual_seed(0)
        model = Gpt(cfg, args.dropout).to(device).train()
        if not apply_policy(policy, [model.blocks], model):
            print(f"{policy:<14} not expressible in PyTorch {torch.__version__}")
            rows.append({"policy": policy, "supported": False})
            continue

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
                return model(idx, targets)

        times, heap, device_peak = time_steps(model, step, args.steps, args.warmup, tracker, on_gpu)
        rows.append(policy_row(policy, times, heap, device_peak, cfg["batch"] * cfg["seq_len"], "tokens"))
    if args.json:
        doc = {"schema": "remat-bench-peer/1", "torch": torch.__version__, "threads": args.threads,
               "device": str(device), "dtype": args.dtype,
               "config": args.config, "parameters": sum(p.numel() for p in Gpt(cfg, args.dropout).parameters()),
               "fused_attention": HAS_SDPA, "selective_checkpointing": HAS_SAC,
               "policies": rows}
        write_json(args.json, doc)


if __name__ == "__main__":
    main()
