"""Plan-only figures of the ring on the LongNet schedule: bytes each rank sends and the peak size of its
receive buffers, for sequences up to 1B tokens over up to 1024 ranks (``n_local`` fixed), from
:func:`~dilated_attention_pytorch.parallel.ring_plan` alone (no tensors; seconds on a CPU).

    python benchmarks/ring_plan_figures.py --out benchmarks/results/ring-plan-figures.json --plot figures.png

Schedule: ``w_i = base·4^i`` up to the first ``>= N``, ``r_i = w_i / base`` (h = 16, d = 128, bf16, b = 1,
``"paper"`` offsets), causal and not. Per P (N = P·n_local), over the ranks sampled (0, 1, P/4, P/2,
3P/4, P-2, P-1; every rank with ``--all-ranks``), the largest of:

- ``sent``: bytes sent per step, forward (keys and values of the rows it shares) plus backward (the
  gradients of the rows it received, back to their owners);
- ``peak_recv``: receive buffers alive at once: the forward's (kept for backward) plus the backward's
  (gradients of the rows it sent), plus the float32 gradient accumulators of the received rows;
- ``peers``: ranks it receives from (messages);
- ``spanning``: patterns whose rows this rank sends or receives.

Every pattern attends ``base``-row dilated segments, so the rows one pattern moves per rank are bounded
by a constant (at most ``base`` rows per head each way); the schedule gains one pattern per 4× N, so
the totals are flat per pattern and grow with the number of patterns (``log4 N``), never with N itself.
The number of peers does grow with P: the largest segment spans every rank.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

from dilated_attention_pytorch.parallel.ring_plan import ring_plan
from dilated_attention_pytorch.patterns import pattern_groups


def longnet_schedule(base: int, n: int) -> tuple[list[int], list[int]]:
    segs = [base]
    while segs[-1] < n:
        segs.append(segs[-1] * 4)
    return segs, [w // base for w in segs]


def sampled_ranks(world: int, every: bool) -> list[int]:
    if every:
        return list(range(world))
    return sorted({r for r in (0, 1, world // 4, world // 2, 3 * world // 4, world - 2, world - 1) if 0 <= r < world})


def rank_figures(world: int, rank: int, n_local: int, heads: int, head_dim: int, itemsize: int, base: int,
                 causal: bool) -> dict:
    segs, dils = longnet_schedule(base, world * n_local)
    plan = ring_plan(world, rank, n_local, heads, heads, segs, dils, "paper", False, causal)
    groups = pattern_groups(world * n_local, heads, segs, dils, "paper", False)
    fwd_sent = plan.forward_bytes_sent(1, head_dim, itemsize)
    fwd_recv = plan.forward_bytes_received(1, head_dim, itemsize)
    return {
        "rank": rank,
        "sent": fwd_sent + fwd_recv,  # backward sends back as many bytes as the forward received
        "peak_recv": fwd_recv + fwd_sent + fwd_recv * 4 // itemsize,
        "peers": len(plan.recvs),
        "spanning": len({groups[t.group].segment for _, ts in plan.sends + plan.recvs for t in ts}),
        "patterns": len(segs),
    }


def figures(worlds: list[int], n_local: int, heads: int, head_dim: int, itemsize: int, base: int, causal: bool,
            every: bool) -> list[dict]:
    rows = []
    for world in worlds:
        t0 = time.perf_counter()
        per_rank = [rank_figures(world, r, n_local, heads, head_dim, itemsize, base, causal)
                    for r in sampled_ranks(world, every)]
        row = {"world": world, "n_total": world * n_local, "causal": causal, "patterns": per_rank[0]["patterns"],
               "ranks": [r["rank"] for r in per_rank], "plan_s_per_rank": (time.perf_counter() - t0) / len(per_rank)}
        for key in ("sent", "peak_recv", "peers", "spanning"):
            worst = max(per_rank, key=lambda r: r[key])
            row[f"max_{key}"], row[f"max_{key}_rank"] = worst[key], worst["rank"]
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| causal | P | N | patterns | max sent MiB | max peak recv MiB | max peers | max spanning patterns | "
             "plan s/rank |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['causal']} | {r['world']} | {r['n_total']:,} | {r['patterns']} | "
                     f"{r['max_sent'] / 2**20:.4g} | {r['max_peak_recv'] / 2**20:.4g} | {r['max_peers']} | "
                     f"{r['max_spanning']} | {r['plan_s_per_rank']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Max bytes sent and peak receive buffers per rank against N (log x), causal and not (needs matplotlib)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for causal, style in ((False, "-"), (True, "--")):
        sel = [r for r in rows if r["causal"] == causal]
        for key, label, marker in (("max_sent", "sent (fwd+bwd)", "o"), ("max_peak_recv", "peak receive buffers", "s")):
            ax.plot([r["n_total"] for r in sel], [r[key] / 2**20 for r in sel], style, marker=marker,
                    label=f"{label}, {'causal' if causal else 'non-causal'}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("sequence length N (tokens; n_local fixed, P = N / n_local)")
    ax.set_ylabel("MiB per rank (max over sampled ranks)")
    ax.set_title("Ring on the LongNet schedule, from the plan: bytes per rank vs N", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="JSON file to write")
    p.add_argument("--n-local", type=int, default=1 << 20, help="tokens per rank (default 1M: 1024 ranks = 1B)")
    p.add_argument("--world", type=int, nargs="+", default=[2 ** k for k in range(1, 11)])
    p.add_argument("--base", type=int, default=2048, help="rows of every dilated segment")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--itemsize", type=int, default=2, help="bytes per element (2: bf16)")
    p.add_argument("--all-ranks", action="store_true", help="every rank, not a sample (slow at 1024 ranks)")
    p.add_argument("--plot", default=None, help="PNG file to draw (needs matplotlib)")
    return p


def main(argv: Optional[list[str]] = None) -> list[dict]:
    a = build_parser().parse_args(argv)
    rows = []
    for causal in (False, True):
        rows += figures(a.world, a.n_local, a.heads, a.head_dim, a.itemsize, a.base, causal, a.all_ranks)
    print(markdown(rows))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    if a.plot:
        plot(rows, Path(a.plot))
    return rows


if __name__ == "__main__":
    main()
