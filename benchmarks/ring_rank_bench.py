"""One rank of the sequence-parallel ring, timed on ONE device: a profiler of a rank's critical path,
not a test of communication.

    python benchmarks/ring_rank_bench.py --n-local 262144 --out benchmarks/results/ring_rank.json  # H200
    python benchmarks/ring_rank_bench.py --smoke --out /tmp/ring_rank.json                           # CPU, seconds

For rank ``p`` of ``P`` it builds exactly the tensors that rank holds (its shard of ``N = P·n_local``
tokens) and, from the rank's plan (:func:`~dilated_attention_pytorch.parallel.ring_plan`), the packed
key/value rows the other ranks would send it; then it times the rank's forward and forward+backward
through the code the ring runs (``ring_shard``: the ring's program on the executor, plus single-device
attention on the core; ``attend`` when no segment crosses a shard boundary). The exchange is in-process:
its receives are copies of the packed rows (the bytes a peer would send), the gradients it would send
back are packed and discarded, and the gradients it would receive are zeros (their scatter-add into
dK/dV is still timed). No collective call is made.

Regimes: ``longnet`` (LongNet §3.1: ``w_i = base·4^i`` up to the first ``>= N``, ``r_i = w_i / base``:
every pattern attends ``base``-row dilated segments, the largest spans every shard), ``aligned`` and
``straddling`` (the cases of ``benchmarks/ring_scaling.py``: ``w = 2048..32768``, ``r = 1..16``, shards of
``n_local`` and of ``n_local - 1024`` tokens).

Per (regime, causal, P): the ranks timed (first, middle, last, then the first rank of every other
distinct plan, up to ``--max-ranks``), each one's fwd and fwd+bwd milliseconds, useful TF/s (attended
query-key pairs of its query rows, :mod:`~dilated_attention_pytorch.bench.flops`), the bytes it receives
(from the plan), the slowest rank; the single-device time on the whole sequence divided by ``P`` where
``N <= --single-max`` (fused on a GPU); and the dense-ceiling rate for the same rows (cuDNN SDPA on
shapes with the same pairs: per pattern, its segments inside the shard as a batch of square problems,
a segment crossing the shard as the rank's rows against as many keys as they attend on average).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from dilated_attention_pytorch import dilated_attention
from dilated_attention_pytorch.backends import choose_backend
from dilated_attention_pytorch.bench.flops import attended_pairs, useful_flops
from dilated_attention_pytorch.bench.measure import time_calls
from dilated_attention_pytorch.functional import attend, attention_args
from dilated_attention_pytorch.parallel.ring import _BACKENDS, BACKWARD_GRADS, FORWARD_ROWS, _RingExchange, ring_shard
from dilated_attention_pytorch.parallel.ring_plan import RingPlan, _rows_of, ring_plan
from dilated_attention_pytorch.parallel.ring_wire import pack, wire
from dilated_attention_pytorch.patterns import pattern_groups

SEGMENTS, DILATIONS = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]  # benchmarks/ring_scaling.py
REGIMES = ("longnet", "aligned", "straddling")


@dataclass(frozen=True, eq=False)
class InProcessExchange(_RingExchange):
    """The ring's exchange with its transfers replaced by copies: ``incoming[i]`` is the packed buffer
    the ``i``-th peer of ``plan.recvs`` would send; gradients sent back are dropped, those received are
    zeros."""

    incoming: tuple = ()

    def _transfer(self, sends, recvs, transfer):
        for i, (_, buf) in enumerate(recvs):
            if transfer == FORWARD_ROWS:
                buf.copy_(self.incoming[i])
            else:
                assert transfer == BACKWARD_GRADS
                buf.zero_()
        return []

    def _wait(self, works, device):
        """Nothing to wait for: :meth:`_transfer` filled the buffers already."""


def longnet_schedule(base: int, n: int) -> tuple[list[int], list[int]]:
    segs = [base]
    while segs[-1] < n:
        segs.append(segs[-1] * 4)
    return segs, [w // base for w in segs]


@dataclass(frozen=True)
class Setting:
    regime: str
    world: int
    n_local: int
    segs: tuple
    dils: tuple
    causal: bool
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def n(self) -> int:
        return self.world * self.n_local

    def plan(self, rank: int) -> RingPlan:
        """Rank ``rank``'s plan as the ring makes it: without core on a GPU (the fused path, one program over
        the shard), with core elsewhere."""
        return ring_plan(self.world, rank, self.n_local, self.heads, self.kv_heads, self.segs, self.dils, "paper",
                         False, self.causal, with_core=self.device.type != "cuda", diagonal_blocks=True)


def setting(regime: str, world: int, n_local: int, causal: bool, a) -> Setting:
    if regime == "longnet":
        segs, dils = longnet_schedule(a.base, world * n_local)
    else:
        segs, dils = (SEGMENTS, DILATIONS) if not a.smoke else ([8, 16, 32], [1, 2, 4])
        n_local = n_local - (1024 if not a.smoke else 8) * (regime == "straddling")
    return Setting(regime, world, n_local, tuple(segs), tuple(dils), causal, a.heads, a.kv_heads or a.heads,
                   a.head_dim, getattr(torch, a.dtype), torch.device(a.device))


def shard(s: Setting, rank: int, which: int, seed: int) -> torch.Tensor:
    """Rank ``rank``'s shard of q (0), k (1), v (2) or dout (3): the same values wherever it is built."""
    g = torch.Generator(device=s.device).manual_seed(seed * 1_000_003 + rank * 4 + which)
    heads = s.heads if which in (0, 3) else s.kv_heads
    return torch.randn((1, s.n_local, heads, s.head_dim), generator=g, device=s.device, dtype=s.dtype)


def incoming(s: Setting, plan: RingPlan, seed: int) -> tuple:
    """What each peer of ``plan.recvs`` would send this rank (built from that peer's own shard)."""
    out = []
    for peer, _ in plan.recvs:
        sender = s.plan(peer)
        k, v = shard(s, peer, 1, seed), shard(s, peer, 2, seed)
        parts = pack(sender, k, v, None).split(wire(sender, 1, s.kv_heads, s.head_dim, False, s.device).send_sizes)
        out.append(parts[[p for p, _ in sender.sends].index(plan.rank)])
    return tuple(out)


def rank_call(s: Setting, rank: int, seed: int, backward: bool) -> tuple[Callable[[], torch.Tensor], tuple]:
    """The ring's work of rank ``rank``: -> (a function running it, forward and backward if asked; the
    rank's (q, k, v, dout))."""
    plan = s.plan(rank)
    q, k, v = (shard(s, rank, i, seed).requires_grad_(backward) for i in range(3))
    dout = shard(s, rank, 3, seed) if backward else None
    args = attention_args(q, k, v, s.segs, s.dils, is_causal=s.causal, scale=None, dropout_p=0.0, offsets="paper",
                          head_groups=False, key_padding_mask=None, return_lse=False, backend="auto",
                          backends=_BACKENDS)
    choice = choose_backend(args.backend, q, None, 0.0, False)
    exchange = None if plan.local_only else InProcessExchange(plan, None, None, 0.0, incoming(s, plan, seed))

    def call() -> torch.Tensor:
        for t in (q, k, v):
            t.grad = None
        if exchange is None:  # no segment crosses a shard boundary: the ring runs attend on the shard
            out = attend(q, k, v, None, args, choice)[0]
        else:
            out = ring_shard(q, k, v, None, args, choice, plan, exchange)[0]
        if backward:
            out.backward(dout)
        return out

    return call, (q, k, v, dout)


def rank_pairs(s: Setting, rank: int) -> dict[tuple[int, int], tuple[int, int, int]]:
    """Per pattern ``(W, r)``: (attended pairs, query rows, segments wholly inside the shard) of rank
    ``rank``'s query rows, summed over heads (batch 1)."""
    lo, hi = rank * s.n_local, (rank + 1) * s.n_local
    out: dict = {}
    for pg in pattern_groups(s.n, s.heads, s.segs, s.dils, "paper", False):
        W, r, o = pg.segment, pg.dilation, pg.offset
        pairs = rows = inside = 0
        for seg in range(lo // W, (hi - 1) // W + 1):
            ss, se = seg * W, min(seg * W + W, s.n)
            total = len(range(o, se - ss, r))
            k_lo, k_hi = _rows_of(max(ss, lo), min(se, hi), ss, o, r)
            pairs += (k_hi * (k_hi + 1) - k_lo * (k_lo + 1)) // 2 if s.causal else (k_hi - k_lo) * total
            rows += k_hi - k_lo
            inside += lo <= ss and se <= hi
        p0, r0, i0 = out.get((W, r), (0, 0, 0))
        out[(W, r)] = (p0 + len(pg.heads) * pairs, r0 + len(pg.heads) * rows, max(i0, inside))
    return out


def plan_signature(plan: RingPlan) -> tuple:
    """What makes two ranks' work differ: own blocks, core length, and per remote call rows and keys."""
    flat = plan.recv_transfers
    own = tuple(sorted((b.span.count, b.span.segment, b.span.rows) for b in plan.own_blocks))
    calls = tuple((c.q_rows.span.rows, sum(flat[i].rows for i in c.keys[0][0])) for c in plan.remote_calls)
    return plan.local_only, plan.core[1] - plan.core[0], own, calls


def ranks_to_time(s: Setting, limit: int) -> tuple[list[int], int]:
    """First, middle and last rank, then the first rank of each other distinct plan (up to ``limit``);
    -> (ranks, number of distinct plans)."""
    chosen = list(dict.fromkeys([0, s.world // 2, s.world - 1]))
    seen = {plan_signature(s.plan(p)) for p in chosen}
    signatures = [plan_signature(s.plan(p)) for p in range(s.world)]
    for p, sig in enumerate(signatures):
        if sig not in seen and len(chosen) < limit:
            chosen.append(p)
            seen.add(sig)
    return sorted(chosen), len(set(signatures))


_SDPA_MS: dict = {}  # one timing per shape: ranks and settings with the same shapes share it


def _sdpa_ms(s: Setting, batch: int, lq: int, lk: int, causal: bool, backward: bool, a) -> float:
    key = (s.heads, s.kv_heads, s.head_dim, s.dtype, s.device, batch, lq, lk, causal, backward)
    if key not in _SDPA_MS:
        _SDPA_MS[key] = _time_sdpa(s, batch, lq, lk, causal, backward, a)
    return _SDPA_MS[key]


def _time_sdpa(s: Setting, batch: int, lq: int, lk: int, causal: bool, backward: bool, a) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = s.device
    q = torch.randn((batch, s.heads, lq, s.head_dim), device=dev, dtype=s.dtype, requires_grad=backward)
    k, v = (torch.randn((batch, s.kv_heads, lk, s.head_dim), device=dev, dtype=s.dtype, requires_grad=backward)
            for _ in range(2))
    g = torch.randn_like(q) if backward else None
    # cuDNN first (as the bench command's ceiling), flash where cuDNN takes no such shape
    backends = ([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
                if dev.type == "cuda" else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])

    def call():
        for t in (q, k, v):
            t.grad = None
        with sdpa_kernel(backends, set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=s.kv_heads != s.heads)
        if backward:
            out.backward(g)

    return _time(call, dev, a)


def ceiling_ms(s: Setting, per_pattern: dict, backward: bool, a) -> float:
    """Dense SDPA on shapes with the rank's pairs, summed over patterns (see the module docstring)."""
    total = 0.0
    for (W, r), (pairs, rows, inside) in per_pattern.items():
        if not pairs:
            continue
        if inside:  # segments inside the shard: a batch of square problems
            total += _sdpa_ms(s, math.ceil(s.n_local / W), math.ceil(W / r), math.ceil(W / r), s.causal, backward, a)
        else:  # the rank's rows of a segment crossing the shard, against their mean number of keys
            lq = max(1, rows // s.heads)
            total += _sdpa_ms(s, 1, lq, max(1, round(pairs / rows)), False, backward, a)
    return total


def _time(call, device, a) -> float:
    return time_calls(call, device, a.warmup, a.repeats, min_warmup_s=a.min_time_s / 2, min_time_s=a.min_time_s).ms


def _tflops(pairs: int, s: Setting, backward: bool, ms: Optional[float]) -> Optional[float]:
    return useful_flops(pairs, s.head_dim, 1, backward) / (ms * 1e-3) / 1e12 if ms else None


def single_device_ms(s: Setting, backward: bool, a) -> Optional[float]:
    """Single-device dilated attention on the whole sequence (fused on a GPU), or None if too long."""
    if s.n > a.single_max:
        return None
    g = torch.Generator(device=s.device).manual_seed(1)
    q = torch.randn((1, s.n, s.heads, s.head_dim), generator=g, device=s.device, dtype=s.dtype)
    k, v = (torch.randn((1, s.n, s.kv_heads, s.head_dim), generator=g, device=s.device, dtype=s.dtype)
            for _ in range(2))
    for t in (q, k, v):
        t.requires_grad_(backward)
    dout = torch.randn_like(q) if backward else None
    backend = "fused" if s.device.type == "cuda" else "auto"

    def call():
        for t in (q, k, v):
            t.grad = None
        out = dilated_attention(q, k, v, list(s.segs), list(s.dils), is_causal=s.causal, backend=backend)
        if backward:
            out.backward(dout)

    ms = _time(call, s.device, a)
    return ms


def whole_output(s: Setting, a) -> Optional[torch.Tensor]:
    """Single-device attention (fused on a GPU) on the whole sequence the ranks' shards make up, or None
    if it is longer than ``--single-max``."""
    if s.n > a.single_max or not a.check:
        return None
    q, k, v = (torch.cat([shard(s, p, i, a.seed) for p in range(s.world)], 1) for i in range(3))
    with torch.no_grad():
        return dilated_attention(q, k, v, list(s.segs), list(s.dils), is_causal=s.causal,
                                 backend="fused" if s.device.type == "cuda" else "auto")


def run_setting(s: Setting, a) -> dict:
    ranks, distinct = ranks_to_time(s, a.max_ranks)
    whole = whole_output(s, a)
    itemsize = torch.finfo(s.dtype).bits // 8
    res = {"regime": s.regime, "world": s.world, "n_local": s.n_local, "n_total": s.n, "causal": s.causal,
           "segments": list(s.segs), "dilations": list(s.dils), "distinct_plans": distinct, "ranks": []}
    for p in ranks:
        plan = s.plan(p)
        per_pattern = rank_pairs(s, p)
        pairs = sum(v[0] for v in per_pattern.values())
        row = {"rank": p, "local_only": plan.local_only, "core_rows": plan.core[1] - plan.core[0],
               "remote_calls": len(plan.remote_calls), "peers_received_from": len(plan.recvs),
               "bytes_received": plan.forward_bytes_received(1, s.head_dim, itemsize),
               "bytes_sent": plan.forward_bytes_sent(1, s.head_dim, itemsize), "pairs": pairs}
        if whole is not None:  # the rank's forward against its rows of the single-device output
            with torch.no_grad():
                out = rank_call(s, p, a.seed, False)[0]()
            ref = whole[:, p * s.n_local:(p + 1) * s.n_local]
            row["max_abs_diff_vs_single"] = (out.float() - ref.float()).abs().max().item()
            row["max_abs_single"] = ref.float().abs().max().item()
        for mode, backward in (("fwd", False), ("fwdbwd", True)):
            call, tensors = rank_call(s, p, a.seed, backward)
            ms = _time(call, s.device, a)
            del call, tensors
            row[f"{mode}_ms"] = ms
            row[f"{mode}_tflops"] = _tflops(pairs, s, backward, ms)
            if a.ceiling:
                c_ms = ceiling_ms(s, per_pattern, backward, a)
                row[f"{mode}_ceiling_tflops"] = _tflops(pairs, s, backward, c_ms)
        res["ranks"].append(row)
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    for mode, backward in (("fwd", False), ("fwdbwd", True)):
        slowest = max(res["ranks"], key=lambda r: r[f"{mode}_ms"])
        mean = sum(r[f"{mode}_ms"] for r in res["ranks"]) / len(res["ranks"])
        single = single_device_ms(s, backward, a) if a.single else None
        res[mode] = {"slowest_rank": slowest["rank"], "slowest_ms": slowest[f"{mode}_ms"],
                     "slowest_over_mean_timed": slowest[f"{mode}_ms"] / mean,
                     "single_device_ms_over_P": None if single is None else single / s.world,
                     "slowest_over_single_over_P": None if single is None else slowest[f"{mode}_ms"] * s.world / single,
                     "single_device_tflops": None if single is None else _tflops(
                         attended_pairs(s.n, s.heads, s.segs, s.dils, is_causal=s.causal), s, backward, single)}
    return res


def markdown(results: list[dict]) -> str:
    head = ("| regime | causal | P | n_local | rank | fwd ms | fwd TF/s | fwd ceil TF/s | fwd+bwd ms | fwd+bwd TF/s | "
            "f+b ceil TF/s | MiB recv | single/P fwd ms | single/P f+b ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def f(x, fmt=".2f"):
        return "–" if x is None else format(x, fmt)

    for r in results:
        for row in r["ranks"]:
            slow = [m for m in ("fwd", "fwdbwd") if r[m]["slowest_rank"] == row["rank"]]
            rank = f"{row['rank']}" + (f" (slowest {'/'.join(slow)})" if slow else "")
            cells = [r["regime"], r["causal"], r["world"], r["n_local"], rank, f(row["fwd_ms"]),
                     f(row["fwd_tflops"], ".3g"), f(row.get("fwd_ceiling_tflops"), ".3g"), f(row["fwdbwd_ms"]),
                     f(row["fwdbwd_tflops"], ".3g"), f(row.get("fwdbwd_ceiling_tflops"), ".3g"),
                     f(row["bytes_received"] / 2**20, ".3g"), f(r["fwd"]["single_device_ms_over_P"]),
                     f(r["fwdbwd"]["single_device_ms_over_P"])]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "| regime | causal | P | n_local | ranks timed (distinct plans) | slowest fwd ÷ single/P | "
              "slowest f+b ÷ single/P | slowest ÷ mean of timed, fwd / f+b | single-device f+b TF/s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cells = [r["regime"], r["causal"], r["world"], r["n_local"],
                 f"{','.join(str(x['rank']) for x in r['ranks'])} ({r['distinct_plans']})",
                 f(r["fwd"]["slowest_over_single_over_P"]), f(r["fwdbwd"]["slowest_over_single_over_P"]),
                 f"{f(r['fwd']['slowest_over_mean_timed'])} / {f(r['fwdbwd']['slowest_over_mean_timed'])}",
                 f(r["fwdbwd"]["single_device_tflops"], ".3g")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (seconds)")
    p.add_argument("--world", type=int, nargs="+", default=[2, 8, 64], help="P values")
    p.add_argument("--n-local", type=int, nargs="+", default=None, help="tokens per rank (default 262144 1048576)")
    p.add_argument("--regimes", nargs="+", choices=REGIMES, default=list(REGIMES))
    p.add_argument("--causal", nargs="+", choices=["false", "true"], default=["false", "true"])
    p.add_argument("--base", type=int, default=None, help="longnet: rows of every dilated segment (default 2048)")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--dtype", default=None, help="default bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--max-ranks", type=int, default=None, help="ranks timed per (regime, causal, P) (default 5)")
    p.add_argument("--single-max", type=int, default=None,
                   help="longest whole sequence timed on one device (default 3670016 = 3.5M)")
    p.add_argument("--no-single", dest="single", action="store_false")
    p.add_argument("--no-ceiling", dest="ceiling", action="store_false")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip comparing each timed rank's output with single-device attention on the whole sequence")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--min-time-s", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=None, help="skip the settings left after this many seconds")
    return p


def main(argv: Optional[list[str]] = None) -> list[dict]:
    a = build_parser().parse_args(argv)
    if a.smoke:
        a.device = "cpu"
        defaults = dict(n_local=[64], base=4, heads=4, head_dim=16, dtype="float32", warmup=1, repeats=1,
                        min_time_s=0.0, single_max=1 << 12, max_ranks=3)
    else:
        defaults = dict(n_local=[1 << 18, 1 << 20], base=2048, heads=16, head_dim=128,
                        dtype="bfloat16" if a.device == "cuda" else "float32", warmup=2, repeats=5, min_time_s=0.1,
                        single_max=3_670_016, max_ranks=5)
    for name, value in defaults.items():  # what the command line leaves unset
        if getattr(a, name) is None:
            setattr(a, name, value)
    results = []
    t0 = time.perf_counter()
    out = Path(a.out)
    for n_local in a.n_local:
        for regime in a.regimes:
            for causal in (c == "true" for c in a.causal):
                for world in a.world:
                    s = setting(regime, world, n_local, causal, a)
                    if a.budget_s is not None and time.perf_counter() - t0 > a.budget_s:
                        print(f"skipped (over --budget-s): {regime} causal={causal} P={world} n_local={s.n_local}")
                        continue
                    results.append(run_setting(s, a))
                    print(f"done: {regime} causal={causal} P={world} n_local={s.n_local} "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)
                    device = torch.cuda.get_device_name() if s.device.type == "cuda" else platform.processor() or "cpu"
                    report = {"device": device, "torch": torch.__version__, "args": vars(a),
                              "elapsed_s": time.perf_counter() - t0, "results": results}
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(report, indent=1, default=str))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
