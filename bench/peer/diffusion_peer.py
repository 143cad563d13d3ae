#!/usr/bin/env python3
"""The PyTorch peer of `remat-bench --model dit|unet`: remat's DiT (models/dit.cpp: MMDiT double
blocks, Flux single blocks, adaLN-Zero) and UNet (models/unet.cpp: GroupNorm/SiLU/conv residual
blocks, attention at the lowest resolution, skip connections), the same sizes, parameter names and
init scheme, trained on the same rectified-flow loss with the same batch shape, under the
checkpoint policies PyTorch expresses:
  none          no checkpointing
  full          torch's checkpoint around every block (dit: each double and single block; unet:
                each resolution level of the down and up paths, as remat's block containers)
  block_skip:N  every N-th block of each container checkpointed
  ops           one selective checkpoint around the model saving matrix products and attention
A step is forward plus backward of the loss. Run it under the heap tracker (LD_PRELOAD) for heap
peaks measured as remat's are: `python3 bench/peer/run_peers.py --model dit` does both sides, after
checking that the twin computes remat's function: `remat-bench twin --model dit --out F` writes
one f64 step of remat's model (perturbed weights, inputs, loss, gradients) and `--check F` here
loads those weights and compares the loss and every gradient.
"""
import argparse
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from peer_common import HAS_SAC, apply_policy, check_twin, heap_tracker, policy_row, time_steps, write_json

DIT_CONFIGS = {
    "tiny": dict(image=8, patch=2, channels=32, heads=4, double_blocks=2, single_blocks=2, classes=4, batch=4),
    "small": dict(image=32, patch=2, channels=256, heads=8, double_blocks=2, single_blocks=4, classes=4, batch=16),
}
UNET_CONFIGS = {
    "tiny": dict(image=8, base=8, groups=4, heads=2, mults=(1, 2), classes=4, batch=4, dropout=0.1),
    "small": dict(image=32, base=32, groups=8, heads=4, mults=(1, 2, 2), classes=4, batch=16, dropout=0.1),
}


def linear(cin, cout, std=0.02):
    """remat's nn::Linear: weights N(0, std) (zeros at std 0), bias zeros."""
    lin = nn.Linear(cin, cout)
    if std > 0:
        nn.init.normal_(lin.weight, std=std)
    else:
        nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def timestep_embedding(t, dim, max_period=10000.0):
    """cos then sin of t at `dim / 2` geometric frequencies (remat's timestep_embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def attention(q, k, v):
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v)
    # PyTorch < 2.0 has no fused attention: the N x N matrix is materialised
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def gelu(x):
    return F.gelu(x, approximate="tanh")  # remat's GELU is the tanh form


# --- DiT ---------------------------------------------------------------------------------------

def sincos_position_embedding(grid, c):
    """A quarter of the channels each for sin and cos of the patch row and of its column."""
    quarter = c // 4
    omega = torch.pow(10000.0, -torch.arange(quarter, dtype=torch.float64) / quarter)
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                          indexing="ij")
    y, x = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega
    table = torch.zeros(grid * grid, c, dtype=torch.float64)
    table[:, :4 * quarter] = torch.cat([torch.sin(y), torch.cos(y), torch.sin(x), torch.cos(x)], dim=1)
    return table.float()


class AdaModulation(nn.Module):
    def __init__(self, c, chunks, zero):
        super().__init__()
        self.chunks = chunks
        self.lin = linear(c, chunks * c, 0.0 if zero else 0.02)

    def forward(self, c):
        return self.lin(F.silu(c)).chunk(self.chunks, dim=1)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def norm(x, shift, scale):
    return modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift, scale)


def to_heads(m, heads):
    b, n, c = m.shape
    return m.view(b, n, heads, c // heads).transpose(1, 2)


def from_heads(m):
    b, h, n, d = m.shape
    return m.transpose(1, 2).reshape(b, n, h * d)


class DitDoubleBlock(nn.Module):
    def __init__(self, cfg, out_std):
        super().__init__()
        c = cfg["channels"]
        self.heads = cfg["heads"]
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", AdaModulation(c, 6, True))
            setattr(self, f"{s}_qkv", linear(c, 3 * c))
            setattr(self, f"{s}_proj", linear(c, c, out_std))
            setattr(self, f"{s}_fc", linear(c, 4 * c))
            setattr(self, f"{s}_fc_out", linear(4 * c, c, out_std))

    def forward(self, img, txt, c):
        m = txt.shape[1]
        mi, mt = self.img_mod(c), self.txt_mod(c)
        qi = self.img_qkv(norm(img, mi[0], mi[1])).chunk(3, dim=2)
        qt = self.txt_qkv(norm(txt, mt[0], mt[1])).chunk(3, dim=2)
        q, k, v = (to_heads(torch.cat([qt[i], qi[i]], dim=1), self.heads) for i in range(3))
        joint = from_heads(attention(q, k, v))
        txt1 = txt + mt[2][:, None] * self.txt_proj(joint[:, :m])
        img1 = img + mi[2][:, None] * self.img_proj(joint[:, m:])
        img2 = img1 + mi[5][:, None] * self.img_fc_out(gelu(self.img_fc(norm(img1, mi[3], mi[4]))))
        txt2 = txt1 + mt[5][:, None] * self.txt_fc_out(gelu(self.txt_fc(norm(txt1, mt[3], mt[4]))))
        return img2, txt2


class DitSingleBlock(nn.Module):
    def __init__(self, cfg, out_std):
        super().__init__()
        c = cfg["channels"]
        self.heads, self.channels = cfg["heads"], c
        self.mod = AdaModulation(c, 3, True)
        self.lin1 = linear(c, 7 * c)
        self.lin2 = linear(5 * c, c, out_std)

    def forward(self, x, c):
        w = self.channels
        shift, scale, gate = self.mod(c)
        q, k, v, mlp = self.lin1(norm(x, shift, scale)).split([w, w, w, 4 * w], dim=2)
        attn = from_heads(attention(to_heads(q, self.heads), to_heads(k, self.heads), to_heads(v, self.heads)))
        return x + gate[:, None] * self.lin2(torch.cat([attn, gelu(mlp)], dim=2))


class Dit(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c, p = cfg["channels"], cfg["patch"]
        self.cfg = cfg
        values = 3 * p * p
        out_std = 0.02 / math.sqrt(2.0 * (cfg["double_blocks"] + cfg["single_blocks"]))
        self.patch_embed = linear(values, c, math.sqrt(2.0 / (values + c)))
        self.pos = nn.Parameter(sincos_position_embedding(cfg["image"] // p, c))
        self.time_in, self.time_out = linear(c, c), linear(c, c)
        self.label_embed = nn.Embedding(cfg["classes"], c)
        nn.init.normal_(self.label_embed.weight, std=0.02)
        self.double_blocks = nn.ModuleList(DitDoubleBlock(cfg, out_std) for _ in range(cfg["double_blocks"]))
        self.single_blocks = nn.ModuleList(DitSingleBlock(cfg, out_std) for _ in range(cfg["single_blocks"]))
        self.final_mod = AdaModulation(c, 2, True)
        self.final_linear = linear(c, values, 0.0)

    def containers(self):
        return [self.double_blocks, self.single_blocks]

    def forward(self, x_t, t, labels):
        b, p, s = x_t.shape[0], self.cfg["patch"], self.cfg["image"]
        g = s // p
        tokens = x_t.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * p * p)
        img = self.patch_embed(tokens) + self.pos
        label = self.label_embed(labels)
        c = self.time_out(F.silu(self.time_in(timestep_embedding(t * 1000.0, self.cfg["channels"])))) + label
        txt = label[:, None]
        for block in self.double_blocks:
            img, txt = block(img, txt, c)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = block(x, c)
        shift, scale = self.final_mod(c)
        out = self.final_linear(norm(x[:, 1:], shift, scale))
        return out.reshape(b, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, s, s)


# --- UNet --------------------------------------------------------------------------------------

class ConvUnit(nn.Module):
    """GroupNorm -> SiLU -> dropout -> 3x3 conv."""

    def __init__(self, cin, cout, groups, dropout, std):
        super().__init__()
        self.groups, self.dropout = groups, dropout
        self.gn_weight, self.gn_bias = nn.Parameter(torch.ones(cin)), nn.Parameter(torch.zeros(cin))
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) * std)
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x):
        h = F.silu(F.group_norm(x, self.groups, self.gn_weight, self.gn_bias, eps=1e-5))
        return F.conv2d(F.dropout(h, self.dropout, self.training), self.weight, self.bias, padding=1)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, temb, cfg):
        super().__init__()
        self.unit1 = ConvUnit(cin, cout, cfg["groups"], 0.0, math.sqrt(1.0 / (9.0 * cin)))
        self.temb_proj = linear(temb, cout)
        self.unit2 = ConvUnit(cout, cout, cfg["groups"], cfg["dropout"], math.sqrt(0.1 / (9.0 * cout)))
        self.skip_weight = nn.Parameter(torch.randn(cout, cin, 1, 1) * math.sqrt(1.0 / cin)) if cin != cout else None

    def forward(self, x, temb):
        h = self.unit1(x) + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.unit2(h)
        return (F.conv2d(x, self.skip_weight) if self.skip_weight is not None else x) + h


class AttnBlock(nn.Module):
    def __init__(self, c, cfg):
        super().__init__()
        self.groups, self.heads = cfg["groups"], cfg["heads"]
        self.gn_weight, self.gn_bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.qkv, self.proj = linear(c, 3 * c), linear(c, c)

    def forward(self, x):
        b, c, hh, ww = x.shape
        h = F.group_norm(x, self.groups, self.gn_weight, self.gn_bias, eps=1e-5).reshape(b, c, hh * ww).transpose(1, 2)
        q, k, v = (to_heads(m, self.heads) for m in self.qkv(h).chunk(3, dim=2))
        y = self.proj(from_heads(attention(q, k, v)))
        return x + y.transpose(1, 2).reshape(x.shape)


class UnetLevel(nn.Module):
    def __init__(self, cin, cout, temb, attend, cfg):
        super().__init__()
        self.res = ResBlock(cin, cout, temb, cfg)
        self.attn = AttnBlock(cout, cfg) if attend else None

    def forward(self, x, temb):
        h = self.res(x, temb)
        return self.attn(h) if self.attn is not None else h


class Path(nn.Module):
    def __init__(self):
        super().__init__()
        self.levels = nn.ModuleList()


class Unet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        base, temb, n = cfg["base"], 4 * cfg["base"], len(cfg["mults"])
        self.cfg = cfg
        self.conv_in_w = nn.Parameter(torch.randn(base, 3, 3, 3) * math.sqrt(1.0 / 27.0))
        self.conv_in_b = nn.Parameter(torch.zeros(base))
        self.time_in, self.time_out = linear(base, temb), linear(temb, temb)
        self.label_embed = nn.Embedding(cfg["classes"], temb)
        nn.init.normal_(self.label_embed.weight, std=0.02)
        self.down, self.up = Path(), Path()
        widths, cin = [], base
        for level in range(n):
            widths.append(base * cfg["mults"][level])
            self.down.levels.append(UnetLevel(cin, widths[level], temb, level == n - 1, cfg))
            cin = widths[level]
        for level in reversed(range(n)):
            self.up.levels.append(UnetLevel(cin + widths[level], widths[level], temb, level == n - 1, cfg))
            cin = widths[level]
        self.conv_out = ConvUnit(cin, 3, cfg["groups"], 0.0, 0.0)

    def containers(self):
        return [self.down.levels, self.up.levels]

    def forward(self, x_t, t, labels):
        temb = self.time_out(F.silu(self.time_in(timestep_embedding(t * 1000.0, self.cfg["base"]))))
        temb = temb + self.label_embed(labels)
        h = F.conv2d(x_t, self.conv_in_w, self.conv_in_b, padding=1)
        skips = []
        for i, level in enumerate(self.down.levels):
            h = level(h, temb)
            skips.append(h)
            if i + 1 < len(self.down.levels):
                h = F.avg_pool2d(h, 2)
        for i, level in enumerate(self.up.levels):
            if i > 0:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = level(torch.cat([h, skips[-1 - i]], dim=1), temb)
        return self.conv_out(h)


# --- the bench ---------------------------------------------------------------------------------

class FlowLoss(nn.Module):
    """Rectified flow (models/images.cpp): x_t = (1 - t) x0 + t x1 with x1 ~ N(0, 1) and t ~ U(0, 1),
    the mean squared error of the predicted velocity against x1 - x0."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x0, labels):
        noise = torch.randn_like(x0)
        t = torch.rand(x0.shape[0], dtype=x0.dtype, device=x0.device)
        tb = t[:, None, None, None]
        v = self.model((1 - tb) * x0 + tb * noise, t, labels)
        return ((v - (noise - x0)) ** 2).mean()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dit", choices=["dit", "unet"])
    ap.add_argument("--config", default="small", choices=sorted(DIT_CONFIGS))
    ap.add_argument("--policies", default="none,full,ops,block_skip:2")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default="")
    ap.add_argument("--check", default="", metavar="FILE",
                    help="instead of timing: compare the twin in f64 with `remat-bench twin`'s FILE (same config)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = (DIT_CONFIGS if args.model == "dit" else UNET_CONFIGS)[args.config]
    make = Dit if args.model == "dit" else Unet
    if args.check:
        twin = make(dict(cfg, dropout=0.0)).double().train()
        check_twin(twin, lambda m, i: ((m(i["x_t"], i["t"], i["labels"]) - i["target"]) ** 2).mean(), args.check)
        return
    tracker = heap_tracker()
    gen = torch.Generator().manual_seed(1)
    # Images in [-1, 1] as the shapes data's are; the values do not change the work a step does.
    x0 = torch.rand(cfg["batch"], 3, cfg["image"], cfg["image"], generator=gen) * 2 - 1
    labels = torch.randint(0, cfg["classes"], (cfg["batch"],), generator=gen)
    parameters = sum(p.numel() for p in make(cfg).parameters())
    print(f"pytorch {torch.__version__} peer: {args.model} {args.config} ({parameters} parameters) on cpu, "
          f"{args.threads} threads, selective checkpointing {'yes' if HAS_SAC else 'no'}")
    rows = []
    for policy in args.policies.split(","):
        torch.manual_seed(0)
        loss = FlowLoss(make(cfg)).train()
        if not apply_policy(policy, loss.model.containers(), loss):
            print(f"{policy:<14} not expressible in PyTorch {torch.__version__}")
            rows.append({"policy": policy, "supported": False})
            continue
        times, heap, _ = time_steps(loss, lambda: loss(x0, labels), args.steps, args.warmup, tracker, False)
        rows.append(policy_row(policy, times, heap, None, cfg["batch"], "images"))
    if args.json:
        write_json(args.json, {"schema": "remat-bench-peer/1", "torch": torch.__version__, "threads": args.threads,
                               "device": "cpu", "dtype": "f32", "model": args.model, "config": args.config,
                               "parameters": parameters, "selective_checkpointing": HAS_SAC, "policies": rows})


if __name__ == "__main__":
    main()
