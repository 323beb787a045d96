"""One-command GPU check for the models, decoding, compile and training (writes JSON under ``--out``).

    python benchmarks/models_gpu_check.py --out results/models_gpu

1. ``torch.compile(fullgraph=True)`` with inductor: DilatedAttention, MultiheadDilatedAttention and LongNetLM
   match eager (forward and gradients; bf16 and fp32) and their speed.
2. Incremental decoding on the GPU equals the full causal pass; decode throughput with the bounded cache
   vs recomputing the whole prefix per token; cache size vs a full-history cache.
3. ``explain_auto()`` on this machine.
4. A scaled-up ``train`` run (bf16, long context) for ``--train-steps`` steps: time, tokens/s, bits-per-byte.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Callable

import torch

from dilated_attention_pytorch import explain_auto
from dilated_attention_pytorch.models import LongNetLM

__all__ = ["main"]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    _sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync()
    return (time.perf_counter() - start) / repeats * 1e3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_compile(device: torch.device, s: int) -> list[dict[str, Any]]:
    """``s`` scales the sizes down (1 = full size; a dry run on CPU uses 64)."""
    from dilated_attention_pytorch import DilatedAttention, MultiheadDilatedAttention

    rows = []
    ws = [512 // s, 1024 // s, 2048 // s]
    for dtype in (torch.float32, torch.bfloat16):
        torch._dynamo.reset()
        att = DilatedAttention(ws, [1, 2, 4])
        q, k, v = (torch.randn(2, 4096 // s, 8, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        comp = torch.compile(att, fullgraph=True)
        out = comp(q, k, v, is_causal=True)
        g = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        ref = att(q, k, v, is_causal=True)
        gr = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
        rows.append({
            "module": "DilatedAttention", "dtype": str(dtype), "rel_err_out": _rel(out, ref),
            "rel_err_grads": [_rel(a, b) for a, b in zip(g, gr)],
            "eager_fwd_ms": _timed(lambda: att(q, k, v, is_causal=True), 10),
            "compiled_fwd_ms": _timed(lambda: comp(q, k, v, is_causal=True), 10),
        })
        torch._dynamo.reset()
        mha = MultiheadDilatedAttention(512, 8, segment_lengths=ws, dilation_rates=[1, 2, 4], device=device,
                                        dtype=dtype)
        x = torch.randn(2, 4096 // s, 512, device=device, dtype=dtype)
        comp = torch.compile(mha, fullgraph=True)
        rows.append({"module": "MultiheadDilatedAttention", "dtype": str(dtype),
                     "rel_err_out": _rel(comp(x, x, x, is_causal=True)[0], mha(x, x, x, is_causal=True)[0]),
                     "eager_fwd_ms": _timed(lambda: mha(x, x, x, is_causal=True), 10),
                     "compiled_fwd_ms": _timed(lambda: comp(x, x, x, is_causal=True), 10)})
    torch._dynamo.reset()
    torch.manual_seed(0)
    lm = LongNetLM(vocab_size=256, embed_dim=512, num_heads=8, num_layers=4, segment_lengths=tuple(ws),
                   dilation_rates=(1, 2, 4)).to(device)
    ids = torch.randint(0, 256, (2, 4096 // s), device=device)
    comp = torch.compile(lm, fullgraph=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = comp(ids)
        ref = lm(ids)
    grads = torch.autograd.grad(out.float().logsumexp(-1).sum(), list(lm.parameters()))
    ref_grads = torch.autograd.grad(ref.float().logsumexp(-1).sum(), list(lm.parameters()))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        eager_ms = _timed(lambda: lm(ids), 5)
        comp_ms = _timed(lambda: comp(ids), 5)
    with torch.no_grad():
        exact = lm(ids)  # float32, eager: both bf16 runs are judged against it
    rows.append({"module": "LongNetLM (autocast bf16)", "rel_err_logits": _rel(out, ref),
                 "compiled_bf16_vs_fp32": _rel(out, exact), "eager_bf16_vs_fp32": _rel(ref, exact),
                 "max_rel_err_grads": max(_rel(a, b) for a, b in zip(grads, ref_grads)),
                 "eager_fwd_ms": eager_ms, "compiled_fwd_ms": comp_ms})
    return rows


@torch.no_grad()
def check_decoding(device: torch.device, s: int) -> dict[str, Any]:
    torch.manual_seed(0)
    n, new = 2600 // s, 512 // s
    model = LongNetLM(vocab_size=256, embed_dim=512, num_heads=8, num_kv_heads=2, num_layers=4,
                      segment_lengths=(256 // s, 512 // s, 1024 // s), dilation_rates=(1, 2, 4),
                      positions="xpos").to(device).eval()
    ids = torch.randint(0, 256, (4, n), device=device)
    full = model(ids)
    state = model.new_state(4)
    parts = [model(ids[:, :100 // s], state)] + [model(ids[:, t : t + 1], state) for t in range(100 // s, n)]
    inc = torch.cat(parts, 1)
    prompt = ids[:, :64 // s]
    _sync()
    t0 = time.perf_counter()
    model.generate(prompt, new, temperature=0)
    _sync()
    cached_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    seq = prompt
    for _ in range(new // 4):  # no cache: the whole prefix per token (a quarter of the tokens: it is slow)
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    _sync()
    recompute_s = (time.perf_counter() - t0) * 4
    history = 2 * 4 * n * 2 * 64 * 4  # k+v, batch, positions, kv heads, head dim, layers
    return {
        "max_abs_err_logits_fp32": (inc - full).abs().max().item(), "rel_err": _rel(inc, full),
        "cache_elements": state.numel(), "full_history_cache_elements": history,
        "new_tokens": new, "generate_batch4_s": cached_s, "recompute_batch4_s_estimate": recompute_s,
    }


def run_train(out: str, steps: int, dry_run: bool) -> dict[str, Any]:
    from dilated_attention_pytorch.training import train

    if dry_run:
        sizes = ["--device", "cpu", "--context", "64", "--segments", "16", "32", "64", "--dilations", "1", "2", "4",
                 "--embed-dim", "32", "--layers", "2", "--heads", "2", "--batch-size", "2"]
    else:
        sizes = ["--device", "cuda", "--context", "8192", "--segments", "1024", "2048", "4096", "8192",
                 "--dilations", "1", "2", "4", "8", "--embed-dim", "512", "--layers", "8", "--heads", "8",
                 "--batch-size", "8"]
    return train.run(train.build_parser().parse_args(sizes + [
        "--out", os.path.join(out, "train_gpu"), "--dtype", "bfloat16", "--steps", str(steps),
        "--eval-every", str(max(1, steps // 5)), "--eval-windows", "32", "--save-every", str(steps), "--lr", "1e-3",
        "--warmup", str(max(1, steps // 20)), "--attention-type", "auto", "--no-progress",
    ]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python benchmarks/models_gpu_check.py", description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--train-steps", type=int, default=600)
    p.add_argument("--skip", nargs="*", default=[], choices=["compile", "decoding", "train"])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (checks the script itself)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.dry_run:
        raise SystemExit("gpu_check needs a CUDA GPU (or --dry-run)")
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cpu" if args.dry_run else "cuda")
    s = 64 if args.dry_run else 1
    result: dict[str, Any] = {"device": "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(0),
                              "torch": torch.__version__,
                              "auto": str(explain_auto()),
                              "auto_bf16_hd64": str(explain_auto(dtype=torch.bfloat16, head_dim=64))}
    path = os.path.join(args.out, "models_gpu.json")

    def dump() -> None:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=2)

    for name, fn in (("decoding", lambda: check_decoding(device, s)), ("compile", lambda: check_compile(device, s)),
                     ("train", lambda: run_train(args.out, args.train_steps, args.dry_run))):
        if name in args.skip:
            continue
        t0 = time.perf_counter()
        result[name] = fn()
        result[f"{name}_wall_s"] = round(time.perf_counter() - t0, 1)
        dump()
        print(json.dumps({name: result[name]}, indent=2, default=str), flush=True)
    dump()
    return result


if __name__ == "__main__":
    main()
