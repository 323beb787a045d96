"""Decoding at a cost independent of the context: tokens/s and cache bytes vs context length.

A stack of Llama-shaped attention layers (q/k/v/o projections; h=32, h_kv=8, d=128, bf16 by default) decodes
``--steps`` tokens after a context of each length, with dilated attention on its bounded cache
(``DilatedKVCache``: one small attention per step over the keys the patterns select) and with SDPA over a
full key/value cache, each eagerly and captured in a CUDA graph (``dilated-graph``: ``StaticDilatedKVCache``,
fixed shapes and positions on the device, the whole stack's step, projections included, captured once and
replayed per token; ``sdpa-graph``: SDPA over a fixed cache of ``context`` rows, the new key written at a
device index, captured the same way). The context is filled cheaply: random keys/values written straight into
the caches (no prefill). The decoded tokens are the last ones of the context, where every pattern's current segment
is nearly full (the most keys a step can see). Default patterns: the LongNet schedule w = 2048·2^i,
r = 2^i up to 64K (at most 6 · 2048 keys per head and step). The SDPA stack shares one full-size cache buffer between
its layers (same reads per layer, a fraction of the memory); its cache bytes are reported for all layers.

    python benchmarks/decode_bench.py                 # one H200: 4K..1M context, batch 1 and 8 (~3 min)
    python benchmarks/decode_bench.py --smoke         # CPU, tiny shapes, seconds (graph methods run eagerly)
    python benchmarks/decode_bench.py --hf-cpu        # HF Llama on CPU: 50 tokens after a 4,000-token prompt

Writes ``decode_bench.json`` and ``decode_bench.png`` (matplotlib) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dilated_attention_pytorch.models.decoding import DilatedKVCache
from dilated_attention_pytorch.models.static_decoding import StaticDilatedKVCache

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# SDPA without cuDNN for every method: cuDNN builds an execution plan for every new key length, i.e. at every
# decode step (tens of ms), which would time plan building instead of attention
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stack:
    """``layers`` attention blocks (projections + attention + residual); weights random, shared by both methods."""

    def __init__(self, a, device, dtype):
        e, h, h_kv, d = a.heads * a.head_dim, a.heads, a.kv_heads, a.head_dim
        self.a, self.e = a, e
        self.w = [
            [torch.randn(o, e, device=device, dtype=dtype) * e**-0.5 for o in (h * d, h_kv * d, h_kv * d, e)]
            for _ in range(a.layers)
        ]

    def qkv(self, i, x):
        a, (wq, wk, wv, _) = self.a, self.w[i]
        b = x.shape[0]
        return (F.linear(x, wq).view(b, 1, a.heads, a.head_dim), F.linear(x, wk).view(b, 1, a.kv_heads, a.head_dim),
                F.linear(x, wv).view(b, 1, a.kv_heads, a.head_dim))

    def out(self, i, x, attn):
        return x + F.linear(attn.reshape(x.shape), self.w[i][3])


def _filled_caches(cls, a, batch, start, device, dtype, **extra):
    """One cache of ``cls`` per layer, filled with ``start`` tokens of random keys/values."""
    caches = []
    for _ in range(a.layers):
        c = cls(segment_lengths=a.segments, dilation_rates=a.dilations, offsets="paper", head_groups=False,
                num_heads=a.heads, num_kv_heads=a.kv_heads, head_dim=a.head_dim, scale=None, batch_size=batch,
                device=device, dtype=dtype, **extra)
        row = torch.randn(batch, 1, a.kv_heads, a.head_dim, device=device, dtype=dtype)
        c.fill(row.expand(batch, start, -1, -1), row.expand(batch, start, -1, -1))  # only the kept rows are copied
        caches.append(c)
    return caches


def _cached_step(stack, caches):
    def step(x):
        for i, c in enumerate(caches):
            q, k, v = stack.qkv(i, x)
            x = stack.out(i, x, c.attend(q, k, v))
        return x

    return step


def _dilated(stack, a, batch, context, device, dtype):
    """-> (seconds per token, cache bytes): bounded caches filled to ``context - steps``, then ``steps`` tokens."""
    caches = _filled_caches(DilatedKVCache, a, batch, context - a.steps - a.warmup, device, dtype)
    seconds = _time(_cached_step(stack, caches), batch, stack.e, a, device, dtype)
    return seconds, sum(c.numel() for c in caches) * torch.finfo(dtype).bits // 8


def _dilated_graph(stack, a, batch, context, device, dtype):
    """-> (seconds per token, cache bytes): ``StaticDilatedKVCache`` per layer (room for ``context`` tokens),
    filled to ``context - steps - 2 * warmup``; the stack's step captured in a CUDA graph and replayed."""
    caches = _filled_caches(StaticDilatedKVCache, a, batch, context - a.steps - 2 * a.warmup, device, dtype,
                            max_length=context)

    def replayed():
        for c in caches:
            c.replayed()

    seconds = _time_graph(_cached_step(stack, caches), replayed, batch, stack.e, a, device, dtype)
    return seconds, sum(c.numel() for c in caches) * torch.finfo(dtype).bits // 8


def _sdpa_graph(stack, a, batch, context, device, dtype):
    """-> (seconds per token, cache bytes of all layers): SDPA over a fixed cache of ``context`` rows (every row
    attended: the cost of a static cache of that size), the new key/value written at a device index."""
    shape = (batch, a.kv_heads, context, a.head_dim)
    keys, values = torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype)
    pos = torch.tensor([context - a.steps - 2 * a.warmup], device=device)

    def step(x):
        for i in range(a.layers):
            q, k, v = stack.qkv(i, x)
            keys.index_copy_(2, pos, k.transpose(1, 2))
            values.index_copy_(2, pos, v.transpose(1, 2))
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, enable_gqa=True)
            x = stack.out(i, x, out.transpose(1, 2))
        pos.add_(1)
        return x

    seconds = _time_graph(step, lambda: None, batch, stack.e, a, device, dtype)
    return seconds, 2 * a.layers * batch * a.kv_heads * context * a.head_dim * torch.finfo(dtype).bits // 8


def _sdpa(stack, a, batch, context, device, dtype):
    """-> (seconds per token, cache bytes of all layers): SDPA over a full cache of ``context`` rows."""
    shape = (batch, a.kv_heads, context, a.head_dim)
    keys, values = torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype)
    pos = [context - a.steps - a.warmup]

    def step(x):
        t = pos[0]
        for i in range(a.layers):
            q, k, v = stack.qkv(i, x)
            keys[:, :, t], values[:, :, t] = k[:, 0], v[:, 0]
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys[:, :, : t + 1], values[:, :, : t + 1],
                                                 enable_gqa=True)
            x = stack.out(i, x, out.transpose(1, 2))
        pos[0] = t + 1
        return x

    seconds = _time(step, batch, stack.e, a, device, dtype)
    return seconds, 2 * a.layers * batch * a.kv_heads * context * a.head_dim * torch.finfo(dtype).bits // 8


def _time(step, batch, e, a, device, dtype) -> float:
    x = torch.randn(batch, 1, e, device=device, dtype=dtype)
    with torch.no_grad(), sdpa_kernel(SDPA_BACKENDS):
        for _ in range(a.warmup):
            x = step(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            x = step(x)
        _sync(device)
    return (time.perf_counter() - t0) / a.steps


def _time_graph(step, replayed, batch, e, a, device, dtype) -> float:
    """``warmup`` eager steps (they compile the kernels), one step captured in a CUDA graph (its output becomes
    the next step's input inside the graph), ``warmup`` replays, then ``steps`` timed replays. Without CUDA:
    :func:`_time` (eager)."""
    if device.type != "cuda":
        return _time(step, batch, e, a, device, dtype)
    x = torch.randn(batch, 1, e, device=device, dtype=dtype)
    with torch.no_grad(), sdpa_kernel(SDPA_BACKENDS):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(a.warmup):
                x.copy_(step(x))
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x.copy_(step(x))
        for _ in range(a.warmup):
            graph.replay()
            replayed()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            graph.replay()
            replayed()
        _sync(device)
    return (time.perf_counter() - t0) / a.steps


METHODS = {"dilated": _dilated, "sdpa": _sdpa, "dilated-graph": _dilated_graph, "sdpa-graph": _sdpa_graph}


def run(a) -> list[dict]:
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    torch.manual_seed(0)
    stack = Stack(a, device, dtype)
    graphs = device.type == "cuda"
    if not graphs and any(m.endswith("-graph") for m in a.methods):
        print(f"note: no CUDA device ({device}): the -graph methods run eagerly (no graph capture)", flush=True)
    rows = []
    for batch in a.batches:
        for context in a.contexts:
            for method in a.methods:
                fn = METHODS[method]
                try:
                    seconds, nbytes = fn(stack, a, batch, context, device, dtype)
                except torch.OutOfMemoryError:
                    seconds, nbytes = float("nan"), float("nan")
                    torch.cuda.empty_cache()
                row = dict(method=method, batch=batch, context=context, ms_per_token=seconds * 1e3,
                           tokens_per_s=batch / seconds, cache_bytes=nbytes, graph=graphs and method.endswith("-graph"))
                rows.append(row)
                print(f"{method:13s} b={batch:<2d} context={context:>8d}  {row['ms_per_token']:8.3f} ms/token  "
                      f"{row['tokens_per_s']:10.1f} tok/s  cache {nbytes / 2**20:10.1f} MiB", flush=True)
    for r in speedups(rows):
        print(f"{r['dilated']} vs {r['sdpa']}  b={r['batch']:<2d} context={r['context']:>8d}  "
              f"speed-up {r['speedup']:6.2f}x (SDPA ms / dilated ms per token)", flush=True)
    return rows


def speedups(rows) -> list[dict]:
    """Per batch and context: SDPA's time per token over dilated attention's, eager and graph vs graph."""
    time = {(r["method"], r["batch"], r["context"]): r["ms_per_token"] for r in rows}
    out = []
    for dil, sdpa in (("dilated", "sdpa"), ("dilated-graph", "sdpa-graph")):
        for (method, batch, context), ms in time.items():
            if method == dil and (sdpa, batch, context) in time:
                out.append(dict(dilated=dil, sdpa=sdpa, batch=batch, context=context,
                                speedup=time[(sdpa, batch, context)] / ms))
    return out


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        for batch in sorted({r["batch"] for r in rows}):
            sel = [r for r in rows if r["method"] == method and r["batch"] == batch]
            ctx = [r["context"] for r in sel]
            style = dict(marker="o" if method.endswith("-graph") else "s",
                         linestyle="-" if method.startswith("dilated") else "--", label=f"{method}, batch {batch}")
            axes[0].plot(ctx, [r["tokens_per_s"] for r in sel], **style)
            axes[1].plot(ctx, [r["cache_bytes"] / 2**30 for r in sel], **style)
    for ax, label in zip(axes, ("tokens / s", "cache GiB (all layers)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle("Decoding: dilated attention (bounded cache) vs SDPA (full cache)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def hf_cpu(a) -> dict:
    """HF Llama on CPU (float32): prompt + ``new`` greedy tokens, dilated (bounded / default cache) vs SDPA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dilated_attention_pytorch.integrations.hf_cache import DilatedCache
    from dilated_attention_pytorch.integrations.huggingface import register_dilated_attention

    ws, rs = (256, 512, 1024, 2048, 4096), (1, 2, 4, 8, 16)
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 1000, (1, a.prompt))
    name = register_dilated_attention(ws, rs)
    result = {}
    for label, impl, bounded in (("sdpa", "sdpa", False), ("dilated, default cache", name, False),
                                 ("dilated, bounded cache", name, True)):
        model.set_attn_implementation(impl)
        total = decode = float("inf")
        for _ in range(a.repeats):  # best of: generate (prefill + new tokens), and the new tokens alone
            kwargs = {"cache": DilatedCache(config, ws, rs)} if bounded else {}
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new, min_new_tokens=a.new,
                           do_sample=False, pad_token_id=0, **kwargs)
            total = min(total, time.perf_counter() - t0)
            decode = min(decode, _decode_steps(model, ids, a.new, DilatedCache(config, ws, rs) if bounded else None))
        result[label] = dict(generate_s=total, decode_s=decode)
        print(f"{label:24s} prompt {a.prompt} + {a.new} tokens: generate {total:.3f} s, the {a.new} decode steps "
              f"{decode:.3f} s", flush=True)
    return result


def _decode_steps(model, ids, new, cache) -> float:
    """Seconds for ``new`` greedy single-token forward passes after the prompt's (untimed) forward pass."""
    from transformers import DynamicCache

    cache = DynamicCache() if cache is None else cache
    with torch.no_grad():
        tok = model(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new):
            tok = model(tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 65536, 262144, 1048576])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--segments", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument("--dilations", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=16, help="timed tokens per point")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (seconds)")
    p.add_argument("--hf-cpu", action="store_true", help="Hugging Face Llama on CPU: dilated vs SDPA decoding")
    p.add_argument("--prompt", type=int, default=4000, help="--hf-cpu prompt length")
    p.add_argument("--new", type=int, default=50, help="--hf-cpu generated tokens")
    p.add_argument("--repeats", type=int, default=3, help="--hf-cpu runs per point (best kept)")
    p.add_argument("--out", default="benchmarks/results/decode")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.hf_cpu:
        result = hf_cpu(a)
        with open(os.path.join(a.out, "decode_bench_hf_cpu.json"), "w") as f:
            json.dump(result, f, indent=1)
        return
    if a.smoke:
        a.contexts, a.batches, a.layers, a.heads, a.kv_heads, a.head_dim = [512, 2048], [1, 2], 2, 4, 2, 16
        a.segments, a.dilations, a.dtype, a.device, a.steps, a.warmup = [64, 256], [1, 4], "fp32", "cpu", 4, 1
    rows = run(a)
    with open(os.path.join(a.out, "decode_bench.json"), "w") as f:
        json.dump(dict(args=vars(a), rows=rows, speedups=speedups(rows)), f, indent=1)
    plot(rows, os.path.join(a.out, "decode_bench.png"))


if __name__ == "__main__":
    main()
