"""Where the ring's moving key/value rows lie in its flat message buffers, as index tensors built once per
plan: packing the rows a rank sends, laying out received rows for its kernel calls and returning their
gradients are a few indexed copies, however many transfers the plan has.

A message to or from one peer is its transfers' key rows, then their value rows, then (with a key mask)
their key-mask entries padded to whole rows of ``d`` elements; a transfer's rows are ordered (batch row,
dilated row, key/value head). Gradients travel back in the same layout without the mask part.
Received rows are laid out per remote call in kernel order ``(b, H, L, d)``, the key/value head of each
query head selected (so GQA heads share a received row without a copy on the wire).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from .ring_plan import RingPlan

__all__ = ["Wire", "pack", "wire"]


@dataclass(frozen=True, eq=False)
class Wire:
    head_dim: int
    send_sizes: tuple[int, ...]  # elements of each message of plan.sends (with mask parts if with_mask)
    recv_sizes: tuple[int, ...]  # elements of each message of plan.recvs
    send_rows: torch.Tensor  # rows of k.view(-1, d) sent, every peer's in message order
    send_split: tuple[int, ...]  # rows per peer of send_rows
    send_mask: Optional[torch.Tensor]  # positions of key_valid.view(-1) sent, every peer's in message order
    send_mask_split: tuple[int, ...]  # mask entries per peer, and each part's padding to whole rows below
    send_mask_pad: tuple[int, ...]
    call_k: torch.Tensor  # rows of the receive buffer (as (-1, d)) of every call's keys, kernel order
    call_v: torch.Tensor
    call_mask: Optional[torch.Tensor]  # elements of the receive buffer of every call's key mask (b, L)
    call_shapes: tuple[tuple[int, int, int], ...]  # (H, own rows L_own, received rows L) per call
    own_rows: torch.Tensor  # rows of k.view(-1, d) of the calls' own keys (calls with_own), kernel order
    own_mask: Optional[torch.Tensor]  # positions of key_valid.view(-1) of those keys, (b, L_own) per call
    grad_k: torch.Tensor  # call_k, call_v in the gradients' layout (no mask parts)
    grad_v: torch.Tensor
    grad_recv_rows: int  # rows of the gradients this rank sends back (its receive side, no mask)
    grad_recv_split: tuple[int, ...]  # rows per peer of plan.recvs
    grad_send_kpos: torch.Tensor  # rows of the gradients received (plan.sends layout, no mask) for send_rows' keys
    grad_send_vpos: torch.Tensor
    grad_send_split: tuple[int, ...]  # rows per peer of plan.sends


def _message_bases(by_peer, b: int, d: int, with_mask: bool):
    """Per transfer of ``by_peer`` (flat order): (key row base, value row base, mask element base) in one
    buffer of all its messages; and each message's element count."""
    bases, sizes, start = [], [], 0
    for _, ts in by_peer:
        kv_rows = b * sum(t.rows * len(t.kv_heads) for t in ts)
        mask_n = b * sum(t.rows for t in ts)
        mask_rows = -(-mask_n // d) if with_mask else 0
        k_at, m_at = start // d, start + 2 * kv_rows * d
        for t in ts:
            bases.append((k_at, k_at + kv_rows, m_at))
            k_at += b * t.rows * len(t.kv_heads)
            m_at += b * t.rows
        sizes.append((2 * kv_rows + mask_rows) * d)
        start += sizes[-1]
    return bases, sizes


def _transfer_rows(t, b: int) -> torch.Tensor:
    """(b, rows, U) row numbers of a transfer's keys inside its part of a message."""
    u = len(t.kv_heads)
    return (torch.arange(b)[:, None, None] * t.rows + torch.arange(t.rows)[None, :, None]) * u + \
        torch.arange(u)[None, None, :]


@lru_cache(maxsize=64)
def _wire(plan: RingPlan, b: int, h_kv: int, d: int, with_mask: bool) -> Wire:
    n_local = plan.n_local
    send_rows, send_mask, send_split, mask_split, mask_pad = [], [], [], [], []
    for _, ts in plan.sends:
        count = 0
        for t in ts:
            pos = t.src_rows.span.start + t.src_rows.dilation * torch.arange(t.rows)  # shard positions
            batch_pos = torch.arange(b)[:, None] * n_local + pos[None, :]  # (b, rows)
            heads = torch.tensor(t.kv_heads)
            send_rows.append(batch_pos[:, :, None] * h_kv + heads[None, None, :])
            send_mask.append(batch_pos)
            count += b * t.rows
        send_split.append(sum(b * t.rows * len(t.kv_heads) for t in ts))
        mask_split.append(count)
        mask_pad.append(-(-count // d) * d - count)
    send_bases, send_sizes = _message_bases(plan.sends, b, d, with_mask)
    recv_bases, recv_sizes = _message_bases(plan.recvs, b, d, with_mask)
    grad_recv_bases, grad_recv_sizes = _message_bases(plan.recvs, b, d, False)
    grad_send_bases, grad_send_sizes = _message_bases(plan.sends, b, d, False)
    flat = plan.recv_transfers
    call_k, call_v, call_mask, grad_k, grad_v, shapes = [], [], [], [], [], []
    own_rows, own_mask = [], []
    qpk = plan.num_heads // h_kv
    for call in plan.remote_calls:
        blk, own_len = call.q_rows, call.q_rows.span.rows if call.with_own else 0
        if own_len:  # this rank's rows of the segment: per head of the call, its offset's rows
            heads = torch.tensor(blk.head_list(plan.num_heads))
            shift = torch.arange(len(heads)) if blk.diag_m is not None else torch.zeros(len(heads), dtype=torch.long)
            pos = blk.span.start + shift[:, None] + blk.dilation * torch.arange(own_len)[None, :]  # (H, L_own)
            batch_pos = torch.arange(b)[:, None, None] * n_local + pos[None]  # (b, H, L_own)
            own_rows.append(batch_pos * h_kv + (heads // qpk)[None, :, None])
            own_mask.append(batch_pos[:, 0])
        parts = {name: [] for name in ("k", "v", "m", "gk", "gv")}
        for idx, sel in call.keys:  # per query head: its keys, (b, L)
            head = {name: [] for name in parts}
            for i in idx:
                t = flat[i]
                rows = _transfer_rows(t, b)[:, :, sel]  # (b, rows): this head's key/value head
                k0, v0, m0 = recv_bases[i]
                gk0, gv0, _ = grad_recv_bases[i]
                for name, base in (("k", k0), ("v", v0), ("gk", gk0), ("gv", gv0)):
                    head[name].append(base + rows)
                head["m"].append(m0 + torch.arange(b)[:, None] * t.rows + torch.arange(t.rows)[None, :])
            for name in parts:
                parts[name].append(torch.cat(head[name], 1))
        for name, out in (("k", call_k), ("v", call_v), ("gk", grad_k), ("gv", grad_v)):
            out.append(torch.stack(parts[name], 1).reshape(-1))  # (b, H, L)
        call_mask.append(parts["m"][0].reshape(-1))  # one key mask: every head has the same keys (see ring_plan)
        shapes.append((len(call.keys), own_len, parts["k"][0].shape[1]))
    kpos, vpos = [], []
    for t, (k0, v0, _) in zip([t for _, ts in plan.sends for t in ts], grad_send_bases):
        rows = _transfer_rows(t, b).reshape(-1)
        kpos.append(k0 + rows)
        vpos.append(v0 + rows)
    return Wire(
        d, tuple(send_sizes), tuple(recv_sizes), _cat(send_rows), tuple(send_split),
        _cat(send_mask) if with_mask else None, tuple(mask_split), tuple(mask_pad),
        _cat(call_k), _cat(call_v), _cat(call_mask) if with_mask else None, tuple(shapes),
        _cat(own_rows), _cat(own_mask) if with_mask else None,
        _cat(grad_k), _cat(grad_v), sum(grad_recv_sizes) // d, tuple(s // d for s in grad_recv_sizes),
        _cat(kpos), _cat(vpos), tuple(s // d for s in grad_send_sizes),
    )


def _cat(parts: list) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in parts]) if parts else torch.zeros(0, dtype=torch.long)


@lru_cache(maxsize=64)
def wire(plan: RingPlan, b: int, h_kv: int, d: int, with_mask: bool, device: torch.device) -> Wire:
    """The plan's wire layout for ``b`` batch rows of ``h_kv`` key/value heads of size ``d``, its index
    tensors on ``device`` (cached)."""
    w = _wire(plan, b, h_kv, d, with_mask)
    moved = {f: (getattr(w, f).to(device) if isinstance(getattr(w, f), torch.Tensor) else getattr(w, f))
             for f in w.__dataclass_fields__}
    return Wire(**moved)


def pack(plan: RingPlan, k: torch.Tensor, v: torch.Tensor, key_valid: Optional[torch.Tensor]) -> torch.Tensor:
    """One flat buffer of every message of ``plan.sends``, in order (sizes: ``wire(...).send_sizes``)."""
    b, _, h_kv, d = k.shape
    w = wire(plan, b, h_kv, d, key_valid is not None, k.device)
    if not plan.sends:
        return k.new_empty(0)
    ks = k.reshape(-1, d).index_select(0, w.send_rows).split(w.send_split)
    vs = v.reshape(-1, d).index_select(0, w.send_rows).split(w.send_split)
    parts = []
    if key_valid is None:
        for kp, vp in zip(ks, vs):
            parts += [kp.reshape(-1), vp.reshape(-1)]
    else:
        ms = key_valid.reshape(-1).index_select(0, w.send_mask).to(k.dtype).split(w.send_mask_split)
        for kp, vp, mp, pad in zip(ks, vs, ms, w.send_mask_pad):
            parts += [kp.reshape(-1), vp.reshape(-1), mp, k.new_zeros(pad)]
    return torch.cat(parts)
