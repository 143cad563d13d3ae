"""What the PyTorch peers share: the heap tracker's counters, PyTorch's forms of remat's policies
(checkpointed blocks, selective checkpointing that saves matrix products and attention), the timed
steps and the JSON they write."""
import json
import os
import statistics
import time

import torch
from torch.utils.checkpoint import checkpoint

from heap import heap_tracker  # noqa: F401 (the peers take it from here)

HAS_SAC = hasattr(torch.utils.checkpoint, "create_selective_checkpoint_contexts")


def saved_ops():
    """The ops remat's `ops` policy saves: matrix products and attention. Each backend's fused
    attention is its own op (on the CPU `_scaled_dot_product_flash_attention_for_cpu`), so every one
    this PyTorch has is listed: an attention left out would be recomputed."""
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention"]
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


def selective_ops(forward):
    """`forward` under one checkpoint that saves matrix products and attention and recomputes the
    rest: FastVideo's `ops`, which remat's `ops` policy implements."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = saved_ops()

    def policy_fn(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return lambda *a: checkpoint(forward, *a, use_reentrant=False,
                                 context_fn=lambda: create_selective_checkpoint_contexts(policy_fn))


def checkpoint_blocks(containers, every):
    """Every `every`-th block of each container (counted from 0 in each) under torch's checkpoint,
    as remat's `full` (every 1) and `block_skip:N` place their regions."""
    for container in containers:
        for i, block in enumerate(container):
            if i % every == 0:
                block.forward = (lambda f: lambda *a: checkpoint(f, *a, use_reentrant=False))(block.forward)


def apply_policy(policy, containers, module):
    """PyTorch's form of a remat policy: `full` and `block_skip:N` checkpoint blocks of
    `containers`, `ops` puts `module`'s forward under the selective checkpoint. Returns False when
    this PyTorch cannot express the policy."""
    if policy == "none":
        return True
    every = block_interval(policy)
    if every:
        checkpoint_blocks(containers, every)
        return True
    if policy == "ops" and HAS_SAC:
        module.forward = selective_ops(module.forward)
        return True
    return False


def block_interval(policy):
    """1 for full, N for block_skip:N, None for anything else."""
    if policy == "full":
        return 1
    if policy.startswith("block_skip:"):
        return int(policy.split(":")[1])
    return None


def time_steps(model, step, steps, warmup, tracker, on_gpu, seed=7):
    """Runs warmup + steps forward and backward passes of `step()` (which returns the loss) from
    the same random state; returns the step times (ms) after warmup, the heap peak above the step's
    start (bytes; None without the tracker) and the GPU's allocated peak (None on the CPU)."""
    times, heap, device_peak = [], 0, 0
    for i in range(warmup + steps):
        for p in model.parameters():
            p.grad = None
        torch.manual_seed(seed)
        if tracker:
            tracker[2]()
            base = tracker[1]()
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step().backward()
        if on_gpu:
            torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) * 1e3
        if i >= warmup:
            times.append(elapsed)
            if tracker:
                heap = max(heap, tracker[0]() - base)
            if on_gpu:
                device_peak = max(device_peak, torch.cuda.max_memory_allocated())
    return times, (heap if tracker else None), (device_peak if on_gpu else None)


def policy_row(policy, times, heap, device_peak, items_per_step, item_name):
    """The JSON row and the printed line of one policy."""
    med = statistics.median(times)
    row = {"policy": policy, "supported": True, "median_step_ms": med, "min_step_ms": min(times),
           "heap_step_peak_bytes": heap, "device_peak_bytes": device_peak,
           f"{item_name}_per_s": items_per_step / (med / 1e3)}
    memory = f"{heap / 2**20:8.2f} MiB" if heap is not None else "n/a (run under the heap tracker)"
    if device_peak is not None:
        memory = f"{device_peak / 2**20:8.1f} MiB on the GPU (max_memory_allocated)"
    print(f"{policy:<14} median {med:8.1f} ms  min {min(times):8.1f} ms  heap peak {memory}", flush=True)
    return row


def write_json(path, doc):
    """Atomically: a temporary file, then a rename."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, path)


def read_safetensors(path):
    """{name: tensor} from a safetensors file (8-byte little-endian header length, a JSON header, the
    bytes), without the safetensors package."""
    dtypes = {"F64": torch.float64, "F32": torch.float32, "I64": torch.int64, "BF16": torch.bfloat16}
    with open(path, "rb") as f:
        data = f.read()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    body = data[8 + size:]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        flat = torch.frombuffer(bytearray(body[begin:end]), dtype=dtypes[entry["dtype"]]) if end > begin else \
            torch.empty(0, dtype=dtypes[entry["dtype"]])
        tensors[name] = flat.reshape(entry["shape"])
    return tensors


def check_twin(model, loss_fn, path, renames=None, tolerance=1e-10):
    """Loads remat's weights from `path` (written by `remat-bench twin`) into `model` (f64), runs
    `loss_fn(model, inputs)` forward and backward, and compares the loss and every gradient with
    remat's. `renames` maps a module name here to remat's where they differ. Returns the largest
    error relative to each tensor's largest magnitude; raises SystemExit when a name or shape
    differs or the error exceeds `tolerance`."""
    ref = read_safetensors(path)

    def remat_name(name):
        parts = name.split(".")
        return ".".join((renames or {}).get(part, part) for part in parts)

    params = {remat_name(n): p for n, p in model.named_parameters()}
    theirs = {n[len("param."):] for n in ref if n.startswith("param.")}
    if set(params) != theirs:
        raise SystemExit(f"twin check: parameter names differ; only in remat: {sorted(theirs - set(params))}, "
                         f"only in the peer: {sorted(set(params) - theirs)}")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(p.shape) != tuple(ref["param." + name].shape):
                raise SystemExit(f"twin check: {name} is {tuple(p.shape)} here, "
                                 f"{tuple(ref['param.' + name].shape)} in remat")
            p.copy_(ref["param." + name])
    inputs = {n[len("input."):]: t for n, t in ref.items() if n.startswith("input.")}
    loss = loss_fn(model, inputs)
    loss.backward()

    def error(got, want):
        return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()

    worst = ("loss", error(loss.detach(), ref["output.loss"]))
    for name, p in params.items():
        if p.grad is None:
            raise SystemExit(f"twin check: {name} got no gradient here; remat's model uses it")
        e = error(p.grad, ref["grad." + name])
        if e > worst[1]:
            worst = (name, e)
    print(f"twin check: loss {loss.item():.17g} here, {ref['output.loss'].item():.17g} in remat; "
          f"{len(params)} gradients; largest relative error {worst[1]:.3g} ({worst[0]})")
    if not worst[1] <= tolerance:
        raise SystemExit(f"twin check: the peer is not remat's model (error {worst[1]:.3g} > {tolerance:g})")
    return worst[1]
