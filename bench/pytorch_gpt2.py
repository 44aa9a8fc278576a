#!/usr/bin/env python3
"""PyTorch reference of nibble's GPT-2 training step, for the speed comparison of issue 6.

The same model as configs/models/gpt2-124m.toml (or --config another nibble model TOML of the GPT-2
kind: learned positions, LayerNorm, GELU (tanh), tied embeddings): pre-norm blocks, causal
attention through scaled_dot_product_attention (flash), BF16 autocast, fused AdamW, gradient
clipping at 1.0. With --data, windows of the token files nibble trains on (a `nibble prepare`
output: llm.c .bin shards, train_*.bin), at random offsets; without it, random ids. The data matters
to speed through power: at its 700 W cap the H200 lowers its clocks, and the power drawn depends on
the values multiplied.

    python3 bench/pytorch_gpt2.py --config configs/models/gpt2-124m.toml --batch 16 --steps 30 [--compile]
        [--data DIR] [--profile FILE]

Prints one JSON line: tokens/s (median over the steps after warm-up), model FLOPs utilisation
(6 N + 12 L d T per token, against 989.4 TFLOP/s dense BF16 on H100/H200), peak memory (PyTorch's
max allocated, and device memory in use as cudaMemGetInfo sees it, which is what nibble reports).
--profile FILE then runs 3 more steps under torch.profiler and writes their GPU kernels, CUDA time per
step, largest first, to FILE: the counterpart of nibble's per-kernel breakdown (device_check.sh's
profile phase), to see where the two steps differ.
"""
import argparse
import glob
import json
import math
import os
import statistics
import sys
import time
import tomllib

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d, heads, hidden):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.norm2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, hidden, bias=False)
        self.fc_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_proj(F.gelu(self.fc(self.norm2(x)), approximate="tanh"))


class Gpt(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["d_model"]
        self.tok = nn.Embedding(c["vocab_size"], d)
        self.pos = nn.Embedding(c["seq_len"], d)
        self.blocks = nn.ModuleList(Block(d, c["n_heads"], c.get("mlp_hidden", 4 * d)) for _ in range(c["n_layers"]))
        self.norm_f = nn.LayerNorm(d)

    def forward(self, ids, targets):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for blk in self.blocks:
            x = blk(x)
        logits = F.linear(self.norm_f(x), self.tok.weight)  # tied LM head
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def write_profile(path, step, steps):
    """GPU kernels of `steps` steps under torch.profiler, total CUDA time per step, largest first."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    def device_us(e):  # the attribute's name changed from cuda_ to device_ in PyTorch 2.4
        return getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
    rows = [(device_us(e) / steps / 1000, e.count / steps, e.key) for e in prof.key_averages() if device_us(e) > 0]
    rows.sort(reverse=True)
    with open(path, "w") as f:
        f.write(f"# {sum(r[0] for r in rows):.2f} ms of kernels per step, {sum(r[1] for r in rows):.0f} launches\n")
        f.write("ms_per_step\tlaunches_per_step\tkernel\n")
        for ms, n, key in rows:
            f.write(f"{ms:.3f}\t{n:.0f}\t{key}\n")


def load_tokens(data_dir, vocab, dev):
    """The train_*.bin shards of a `nibble prepare` output (llm.c format: 256 int32 header words, magic
    20240520, version 1, token count; then uint16 tokens), concatenated, as int64 on the device."""
    shards = sorted(glob.glob(os.path.join(data_dir, "train_*.bin")))
    if not shards:
        sys.exit(f"{data_dir}: no train_*.bin shards (not a nibble prepare output)")
    parts = []
    for path in shards:
        with open(path, "rb") as f:
            raw = f.read()
        header = torch.frombuffer(bytearray(raw[:1024]), dtype=torch.int32)
        count = int(header[2])
        if int(header[0]) != 20240520 or int(header[1]) != 1 or len(raw) != 1024 + 2 * count:
            sys.exit(f"{path}: not an llm.c token shard (version 1) of the size its header gives")
        parts.append(torch.frombuffer(bytearray(raw[1024:]), dtype=torch.int16).to(torch.int64) & 0xFFFF)
    tokens = torch.cat(parts)
    if int(tokens.max()) >= vocab:
        sys.exit(f"{data_dir}: token ids up to {int(tokens.max())}, the model's vocabulary has {vocab}")
    return tokens.to(dev)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/models/gpt2-124m.toml")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--profile", metavar="FILE", help="write the kernels of 3 profiled steps to FILE")
    ap.add_argument("--data", metavar="DIR", help="train on the token shards of a nibble prepare output")
    a = ap.parse_args()
    with open(a.config, "rb") as f:
        c = tomllib.load(f)
    torch.manual_seed(0)
    dev = "cuda"
    model = Gpt(c).to(dev)
    for name, p in model.named_parameters():  # GPT-2's initialisation, as nibble's (model/gpt.cpp)
        if p.dim() == 2:
            std = 0.02 / math.sqrt(2 * c["n_layers"]) if name.endswith(("proj.weight", "fc_proj.weight")) else 0.02
            torch.nn.init.normal_(p, 0.0, std)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    step_fn = torch.compile(model) if a.compile else model
    t = c["seq_len"]
    tokens = load_tokens(a.data, c["vocab_size"], dev) if a.data else None
    if tokens is not None and len(tokens) < t + 1:
        sys.exit(f"{a.data}: {len(tokens)} tokens, fewer than one window of {t + 1}")
    window = torch.arange(t + 1, device=dev)

    def step():
        if tokens is None:
            ids = torch.randint(0, c["vocab_size"], (a.batch, t + 1), device=dev)
        else:
            ids = tokens[torch.randint(0, len(tokens) - t, (a.batch, 1), device=dev) + window]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_fn(ids[:, :-1], ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times = []
    for i in range(a.warmup + a.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    if a.profile:
        write_profile(a.profile, step, 3)
    tokens = a.batch * t
    tps = tokens / statistics.median(times)
    flops_per_token = 6 * n_params + 12 * c["n_layers"] * c["d_model"] * t
    name = torch.cuda.get_device_name()
    peak = 989.4e12 if ("H100" in name or "H200" in name) else float("nan")
    free, total = torch.cuda.mem_get_info()
    print(json.dumps({
        "impl": "pytorch " + torch.__version__ + (" compile" if a.compile else " eager"),
        "device": name, "params": n_params, "tokens_per_s": tps, "mfu": flops_per_token * tps / peak,
        "max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
        "device_used_mib": (total - free) / 2**20, "final_loss": loss.item()}))


if __name__ == "__main__":
    main()
