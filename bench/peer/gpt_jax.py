#!/usr/bin/env python3
"""The JAX peer of remat-bench: the same GPT as bench/peer/gpt_peer.py (pre-LayerNorm blocks,
causal attention, GELU(tanh) MLP, dropout, tied head; GPT-2 init; the same batch shape and threads),
its blocks in one lax.scan, and the checkpoint policies JAX expresses:
  none          no checkpointing
  full          jax.checkpoint around every block (nothing saved inside a block)
  block_skip:N  every N-th block checkpointed (the scan runs over groups of N blocks)
  ops           jax.checkpoint around the whole model with dots_saveable (matrix products saved)
A step is forward plus backward (jax.value_and_grad), jitted; its time excludes compilation.
Run it under the heap tracker (LD_PRELOAD) for heap peaks measured as remat's are.
"""
import argparse
import json
import os
import statistics
import time

CONFIGS = {
    "tiny": dict(vocab=64, channels=32, heads=4, layers=2, seq_len=16, batch=2),
    "small": dict(vocab=256, channels=256, heads=8, layers=6, seq_len=128, batch=8),
}


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small", choices=sorted(CONFIGS))
    ap.add_argument("--policies", default="none,full,ops,block_skip:2")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--json", default="")
    return ap.parse_args()


ARGS = parse()
# XLA's CPU thread pool is sized by the flags before jax is imported.
os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={ARGS.threads}")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from heap import heap_tracker  # noqa: E402


def init_params(cfg, key):
    c, layers = cfg["channels"], cfg["layers"]
    keys = jax.random.split(key, 3)
    normal = lambda k, shape, std: std * jax.random.normal(k, shape, jnp.float32)
    proj_std = 0.02 / (2 * layers) ** 0.5  # GPT-2: residual projections scaled by 1/sqrt(2 L)
    bk = jax.random.split(keys[2], 4)
    blocks = {  # stacked over layers, for the scan
        "ln1_w": jnp.ones((layers, c)), "ln1_b": jnp.zeros((layers, c)),
        "qkv_w": normal(bk[0], (layers, c, 3 * c), 0.02), "qkv_b": jnp.zeros((layers, 3 * c)),
        "proj_w": normal(bk[1], (layers, c, c), proj_std), "proj_b": jnp.zeros((layers, c)),
        "ln2_w": jnp.ones((layers, c)), "ln2_b": jnp.zeros((layers, c)),
        "fc_w": normal(bk[2], (layers, c, 4 * c), 0.02), "fc_b": jnp.zeros((layers, 4 * c)),
        "out_w": normal(bk[3], (layers, 4 * c, c), proj_std), "out_b": jnp.zeros((layers, c)),
    }
    return {"wte": normal(keys[0], (cfg["vocab"], c), 0.02), "wpe": normal(keys[1], (cfg["seq_len"], c), 0.02),
            "ln_f_w": jnp.ones((c,)), "ln_f_b": jnp.zeros((c,)), "blocks": blocks}


def layer_norm(x, w, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-5) * w + b


def dropout(x, p, key):
    if p == 0:
        return x
    keep = jax.random.bernoulli(key, 1 - p, x.shape)
    return jnp.where(keep, x / (1 - p), 0)


def block(cfg, p, h, key):
    b, t, c = h.shape
    heads, p_drop = cfg["heads"], ARGS.dropout
    k1, k2 = jax.random.split(key)
    qkv = layer_norm(h, p["ln1_w"], p["ln1_b"]) @ p["qkv_w"] + p["qkv_b"]
    q, k, v = (m.reshape(b, t, heads, c // heads) for m in jnp.split(qkv, 3, axis=-1))
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, c)
    h = h + dropout(y @ p["proj_w"] + p["proj_b"], p_drop, k1)
    m = jax.nn.gelu(layer_norm(h, p["ln2_w"], p["ln2_b"]) @ p["fc_w"] + p["fc_b"], approximate=True)
    return h + dropout(m @ p["out_w"] + p["out_b"], p_drop, k2)


def make_loss(cfg, policy):
    layers = cfg["layers"]
    group = 1
    wrap = lambda f: f
    if policy == "full":
        wrap = jax.checkpoint
    elif policy.startswith("block_skip:"):
        group = int(policy.split(":")[1])
        if layers % group:
            return None

    def group_fn(h, xs):
        params, keys = xs
        for i in range(group):  # blocks 0, n, 2n, ... checkpointed: the first of each group
            one = jax.tree_util.tree_map(lambda a: a[i], params)
            f = (jax.checkpoint if group > 1 and i == 0 else wrap)(lambda pp, hh, kk: block(cfg, pp, hh, kk))
            h = f(one, h, keys[i])
        return h, None

    def loss(params, idx, targets, key):
        t = idx.shape[1]
        k0, k1 = jax.random.split(key)
        h = dropout(params["wte"][idx] + params["wpe"][:t], ARGS.dropout, k0)
        grouped = jax.tree_util.tree_map(lambda a: a.reshape((layers // group, group) + a.shape[1:]), params["blocks"])
        keys = jax.random.split(k1, layers).reshape(layers // group, group, 2)
        h, _ = jax.lax.scan(group_fn, h, (grouped, keys))
        logits = layer_norm(h, params["ln_f_w"], params["ln_f_b"]) @ params["wte"].T
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()

    if policy == "ops":
        return jax.checkpoint(loss, policy=jax.checkpoint_policies.dots_saveable)
    return loss


def main():
    cfg = CONFIGS[ARGS.config]
    tracker = heap_tracker()
    rng = jax.random.PRNGKey(1)
    idx = jax.random.randint(rng, (cfg["batch"], cfg["seq_len"]), 0, 13)
    targets = jax.random.randint(jax.random.PRNGKey(2), (cfg["batch"], cfg["seq_len"]), 0, 13)
    print(f"jax {jax.__version__} peer: gpt {ARGS.config} on cpu in f32, {ARGS.threads} threads, blocks in lax.scan")
    rows = []
    for policy in ARGS.policies.split(","):
        loss = make_loss(cfg, policy)
        if loss is None:
            print(f"{policy:<14} not expressible")
            rows.append({"policy": policy, "supported": False})
            continue
        params = init_params(cfg, jax.random.PRNGKey(0))
        step = jax.jit(jax.value_and_grad(loss))
        jax.block_until_ready(step(params, idx, targets, jax.random.PRNGKey(7)))  # compile
        times, heap = [], 0
        for i in range(ARGS.warmup + ARGS.steps):
            if tracker:
                tracker[2]()
                base = tracker[1]()
            start = time.perf_counter()
            out = jax.block_until_ready(step(params, idx, targets, jax.random.PRNGKey(7)))
            elapsed = (time.perf_counter() - start) * 1e3
            del out
            if i >= ARGS.warmup:
                times.append(elapsed)
                if tracker:
                    heap = max(heap, tracker[0]() - base)
        med = statistics.median(times)
        rows.append({"policy": policy, "supported": True, "median_step_ms": med, "min_step_ms": min(times),
                     "heap_step_peak_bytes": heap if tracker else None,
                     "tokens_per_s": cfg["batch"] * cfg["seq_len"] / (med / 1e3)})
        heap_text = f"{heap / 2**20:8.2f} MiB" if tracker else "n/a (run under the heap tracker)"
        print(f"{policy:<14} median {med:8.1f} ms  min {min(times):8.1f} ms  heap peak {heap_text}")
    if ARGS.json:
        doc = {"schema": "remat-bench-peer/1", "peer": "jax", "jax": jax.__version__, "threads": ARGS.threads,
               "device": "cpu", "dtype": "f32", "config": ARGS.config, "policies": rows}
        tmp = ARGS.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2)
        os.replace(tmp, ARGS.json)


if __name__ == "__main__":
    main()
