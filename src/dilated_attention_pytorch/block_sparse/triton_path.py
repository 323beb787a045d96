"""The Triton path: block-sparse kernels of our own, with an exact backward, registered as the
``torch.library`` custom ops ``dilated_attention::block_sparse_fwd`` and ``::block_sparse_bwd`` (with
fake implementations, so ``torch.compile(fullgraph=True)`` keeps them in its graph) and joined by an
``autograd.Function`` that takes only tensors and hashable settings.

Time is proportional to the active blocks: each query tile walks the key blocks of its layout row and
each key tile of the backward the query blocks of its layout column. The layout's lists (built once per
layout and cached like every layout-derived structure, looked up inside the op from the layout tensor)
hold block indices only. On Hopper with aligned
inputs the tiles are loaded through tensor descriptors (the bulk copy engine); elsewhere through
pointer loads (:data:`LOADS`). The kernels also run on the CPU under ``TRITON_INTERPRET=1`` (how the CPU tests check
them).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import astuple, dataclass
from typing import Optional

import torch

from ..capabilities import Backend, Support
from ..kernels import BlockInputs
from .cache import METADATA_CACHE, layout_digest, tensor_bytes

__all__ = ["BWD_OP", "FWD_OP", "LOADS", "TRITON", "TileSettings", "TritonLists", "layout_lists", "start_phases",
           "tile_settings", "triton_block_sparse_attention", "triton_reasons"]

TRITON_TILE = 128  # the layout's blocks must be whole multiples of the kernels' largest tile


TRITON = Backend(
    "triton", Support(devices=("cuda",), triton_interpreter=True, dtypes=(torch.float16, torch.bfloat16),
                      max_head_dim=256, block_multiple=TRITON_TILE, key_mask=False, dropout=False,
                      packages=("triton",)),
    "our block-sparse Triton kernels, no compile step",
)


def triton_reasons(query: torch.Tensor, block_size: int) -> list[str]:
    """Why the Triton path cannot run these inputs (empty: it can)."""
    return TRITON.not_supported_reasons(BlockInputs(query.device.type, query.dtype, query.shape[-1], False, False,
                                                    False, block_size))


@dataclass(frozen=True)
class TritonLists:
    """Per layout head (1 or h): for each query block, the key blocks it sees (``kv_*``), and for each
    key block, the query blocks that see it (``q_*``); each split into *partial* blocks (a token mask
    applies: the causal diagonal, the last key block when ``n % block_size != 0``) and *full* ones.
    ``*_num`` are ``(H, nb)`` int32 counts; ``*_idx`` ``(H, nb, width)`` int32, ascending, all one width."""

    kv_part_num: torch.Tensor
    kv_part_idx: torch.Tensor
    kv_full_num: torch.Tensor
    kv_full_idx: torch.Tensor
    q_part_num: torch.Tensor
    q_part_idx: torch.Tensor
    q_full_num: torch.Tensor
    q_full_idx: torch.Tensor
    active_blocks: int


def layout_lists(layout: torch.Tensor, seq_len: int, block_size: int, is_causal: bool) -> TritonLists:
    """The kernels' block lists of a validated ``(H, nb, nb)`` bool layout."""
    _, nb, _ = layout.shape
    blocks = torch.arange(nb, device=layout.device)
    active = layout.clone()
    diagonal = torch.zeros_like(active)
    if is_causal:
        active &= blocks[None, None, :] <= blocks[None, :, None]
        diagonal = active & (blocks[None, None, :] == blocks[None, :, None])
    partial = diagonal.clone()
    if seq_len % block_size:
        partial[:, :, nb - 1] |= active[:, :, nb - 1]  # keys past the end are masked
    full = active & ~partial
    # a key tile needs its mask only on the causal diagonal (queries past the end add nothing)
    q_partial, q_full = diagonal, active & ~diagonal
    parts = [partial, full, q_partial.transpose(1, 2), q_full.transpose(1, 2)]
    width = max(1, max(int(p.sum(-1).max()) for p in parts))
    lists = []
    for p in parts:
        num = p.sum(-1, dtype=torch.int32)
        idx = torch.argsort(p.to(torch.int8), dim=-1, descending=True, stable=True)[..., :width]
        lists += [num.contiguous(), idx.to(torch.int32).contiguous()]
    return TritonLists(*lists, active_blocks=int(active.sum()))


@dataclass(frozen=True)
class TileSettings:
    """Launch settings: forward query/key tiles; backward key tile and its query tile (dK, dV), query
    tile and its key tile (dQ); warps and pipeline stages of each kernel. ``align``: programs start their
    block walks where the programs running beside them are (:func:`start_phases`). ``split_bwd``: the
    backward's dQ programs in a launch of their own, after the dK/dV programs (each kernel then needs
    fewer registers: 128 bytes of spills per thread in the dK/dV kernel instead of 376 in one kernel)."""

    fwd_m: int
    fwd_n: int
    fwd_warps: int
    fwd_stages: int
    bwd_m1: int
    bwd_n1: int
    bwd_m2: int
    bwd_n2: int
    bwd_warps: int
    bwd_stages: int
    align: bool = True
    split_bwd: bool = True

    def __post_init__(self) -> None:
        for name in ("align", "split_bwd"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TileSettings.{name} must be a bool, but got {getattr(self, name)!r}")
        for name in ("fwd_m", "fwd_n", "fwd_warps", "fwd_stages", "bwd_m1", "bwd_n1", "bwd_m2", "bwd_n2",
                     "bwd_warps", "bwd_stages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TileSettings.{name} must be an int >= 1, but got {value!r}")


def tile_settings(head_dim: int, device: torch.device) -> TileSettings:
    """Tiles by head dim (a 256-wide head needs smaller tiles to fit registers and shared memory)."""
    if device.type != "cuda":  # the interpreter: small tiles keep CPU tests fast
        return TileSettings(128, 128, 4, 1, 64, 128, 128, 64, 4, 1)
    if head_dim <= 128:
        return TileSettings(128, 128, 8, 3, 64, 128, 128, 64, 8, 2)  # stages measured on an H200
    return TileSettings(64, 64, 4, 2, 64, 64, 64, 64, 4, 2)


LOADS = ("pointers", "descriptors-4d", "descriptors-2d")


def _loads_for(loads: Optional[str], *tensors: torch.Tensor) -> int:
    """How the kernels load tiles (0 pointers, 1 4-d descriptors, 2 2-d descriptors; see the kernels).

    ``loads`` None: the best the device and the inputs allow (descriptors need Hopper or later, a
    16-byte aligned base and 16-byte multiples of strides; 2-d ones also a power-of-2 head dim, a dense
    ``(b, n, heads, d)`` layout and, for b > 1, n a multiple of 128). Naming a kind asks for it (also
    in the interpreter) and raises where the inputs do not allow it."""
    if loads == "pointers":
        return 0
    t0 = tensors[0]
    if loads is None and (t0.device.type != "cuda" or torch.cuda.get_device_capability(t0.device)[0] < 9):
        return 0
    aligned = all(t.data_ptr() % 16 == 0 and all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1])
                  for t in tensors)
    b, n, _, d = t0.shape
    dense = all(t.stride() == (n * t.shape[2] * d, t.shape[2] * d, d, 1) or (b == 1 and t.stride()[1:] == (
        t.shape[2] * d, d, 1)) for t in tensors)
    flat_ok = aligned and dense and d >= 16 and d & (d - 1) == 0 and (b == 1 or n % TRITON_TILE == 0)
    if loads is None:
        return 2 if flat_ok else 1 if aligned else 0
    ok = flat_ok if loads == "descriptors-2d" else aligned
    if not ok:
        raise ValueError(f"loads={loads!r} is not possible for these inputs (shape {tuple(t0.shape)}, strides "
                         f"{[t.stride() for t in tensors]}, dtype {t0.dtype})")
    return 2 if loads == "descriptors-2d" else 1


def _operand(t: torch.Tensor, rows: int, dp: int, mode: int):
    """The kernels' view of ``t (b, n, heads, d)`` for ``rows``-row tiles: a tensor descriptor
    (``mode`` 1: 4-d with ``(1, rows, 1, dp)`` boxes; 2: 2-d over ``(b * n, heads * d)``) or the tensor."""
    if mode == 0:
        return t
    from triton.tools.tensor_descriptor import TensorDescriptor

    if mode == 2:
        b, n, h, d = t.shape
        return TensorDescriptor(t, [b * n, h * d], [h * d, 1], [rows, dp])
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, rows, 1, dp])


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _metadata(layout: torch.Tensor, seq_len: int, block_size: int, is_causal: bool) -> tuple[tuple, TritonLists]:
    """(cache key, :func:`layout_lists`) of a layout, from the metadata LRU (keyed by its content)."""
    key = ("triton", layout_digest(layout), tuple(layout.shape), seq_len, block_size, is_causal, str(layout.device))
    return key, METADATA_CACHE.get_or_create(
        key, lambda: layout_lists(layout, seq_len, block_size, is_causal), tensor_bytes)


def _cached(key: tuple, make) -> torch.Tensor:
    return METADATA_CACHE.get_or_create(key, make, tensor_bytes)


def _forward(q, k, v, layout, block_size: int, is_causal: bool, scale: float, loads: Optional[str],
             ts: TileSettings):
    from ._triton_kernels import block_sparse_fwd

    b, n, h, d = q.shape
    key, lists = _metadata(layout, n, block_size, is_causal)
    group = h // k.shape[2]
    dp = max(16, 1 << (d - 1).bit_length())
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    mode = _loads_for(loads, q, k, v)
    layout_head = 1 if lists.kv_full_num.shape[0] > 1 else 0
    grid = (_cdiv(n, ts.fwd_m), b * h)
    block_sparse_fwd[grid](
        _operand(q, ts.fwd_m, dp, mode), _operand(k, ts.fwd_n, dp, mode), _operand(v, ts.fwd_n, dp, mode),
        out, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        lists.kv_part_num, lists.kv_part_idx, lists.kv_full_num, lists.kv_full_idx,
        lists.kv_full_num.stride(0), lists.kv_full_idx.stride(0), lists.kv_full_idx.stride(1),
        _cached(key + ("fwd", b, h, ts), lambda: _fwd_phases(lists, b, h, n, block_size, ts, q.device))
        if ts.align else lse,
        n, d, h, group, layout_head, scale * math.log2(math.e),
        IS_CAUSAL=is_causal, BLOCK_M=ts.fwd_m, BLOCK_N=ts.fwd_n, DP=dp, SPARSE_BLOCK=block_size, USE_TMA=mode,
        ALIGN=ts.align,
        num_warps=ts.fwd_warps, num_stages=ts.fwd_stages,
    )
    return out, lse


def _backward(q, k, v, out, lse, dout, dlse, layout, block_size: int, is_causal: bool, scale: float,
              loads: Optional[str], ts: TileSettings):
    from ._triton_kernels import block_sparse_bwd, block_sparse_row_sums

    b, n, h, d = q.shape
    key, lists = _metadata(layout, n, block_size, is_causal)
    h_kv = k.shape[2]
    group = h // h_kv
    dp = max(16, 1 << (d - 1).bit_length())
    mode = _loads_for(loads, q, k, v)
    # the incoming gradient is loaded like q (descriptors want q's dense layout)
    dout = dout.contiguous() if mode else _unit_last(dout)
    delta = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    glse = dlse.contiguous() if dlse is not None else delta
    rows = 64
    block_sparse_row_sums[(_cdiv(n, rows), b * h)](
        out, dout, glse, delta, *out.stride()[:3], *dout.stride()[:3], n, d, h,
        HAS_GLSE=dlse is not None, BLOCK=rows, DP=dp,
    )
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    kv_tiles, q_tiles = _cdiv(n, ts.bwd_n1), _cdiv(n, ts.bwd_m2)
    layout_head = 1 if lists.kv_full_num.shape[0] > 1 else 0

    def launch(which: str) -> None:  # the dK/dV programs ("kv"), the dQ programs ("q") or both ("both")
        grid = (kv_tiles if which == "kv" else group * q_tiles if which == "q" else kv_tiles + group * q_tiles,
                b * h_kv)
        block_sparse_bwd[grid](
            _operand(q, ts.bwd_m1, dp, mode), _operand(k, ts.bwd_n1, dp, mode),
            _operand(v, ts.bwd_n1, dp, mode), _operand(dout, ts.bwd_m1, dp, mode),
            _operand(q, ts.bwd_m2, dp, mode), _operand(k, ts.bwd_n2, dp, mode),
            _operand(v, ts.bwd_n2, dp, mode), _operand(dout, ts.bwd_m2, dp, mode),
            dq, dk, dv, lse, delta,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3],
            *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
            lists.kv_part_num, lists.kv_part_idx, lists.kv_full_num, lists.kv_full_idx,
            lists.q_part_num, lists.q_part_idx, lists.q_full_num, lists.q_full_idx,
            lists.kv_full_num.stride(0), lists.kv_full_idx.stride(0), lists.kv_full_idx.stride(1),
            _cached(key + ("bwd", which, b, h, h_kv, ts),
                    lambda: _bwd_phases(lists, b, h, h_kv, n, block_size, ts, which, q.device))
            if ts.align else delta,
            n, d, h, h_kv, group, layout_head, scale * math.log2(math.e), scale,
            0 if which == "q" else kv_tiles, q_tiles,
            IS_CAUSAL=is_causal, BLOCK_M1=ts.bwd_m1, BLOCK_N1=ts.bwd_n1, BLOCK_M2=ts.bwd_m2, BLOCK_N2=ts.bwd_n2,
            DP=dp, SPARSE_BLOCK=block_size, USE_TMA=mode, EVEN_N=n % max(ts.bwd_m1, ts.bwd_m2) == 0,
            ALIGN=ts.align, PROGRAMS={"both": 0, "kv": 1, "q": 2}[which],
            num_warps=ts.bwd_warps, num_stages=ts.bwd_stages,
        )

    if ts.split_bwd:
        launch("kv")
        launch("q")
    else:
        launch("both")
    return dq, dk, dv


def start_phases(work: torch.Tensor, kind: torch.Tensor, slots: int) -> torch.Tensor:
    """Each program's phase in [0, 1): where in its block list it should start so that the programs
    running at one time walk nearby blocks.

    Each program walks a list of key (or query) blocks in ascending order. When all programs take
    equal time they run in waves, each wave walking the sequence side by side, and the blocks one wave
    reads stay in L2. Lists differ in length, so over many waves the programs running together drift
    to different places in the sequence and together read all of a head's keys and values at once (at
    256K tokens, 128 MB per head: more than the L2). So the launch is simulated: ``slots`` programs
    run at once, each taking time ``work`` and the next in launch order starting when one ends; a
    program that starts at time ``t`` starts its walk at the fraction ``frac(t / T)`` of its list
    (wrapping round), with ``T`` the mean work of programs of its ``kind``. Programs of equal work
    get phase 0 (plain waves). Only the order of a sum over blocks changes.

    ``work`` (P,) float in launch order, ``kind`` (P,) int64 (programs of different kinds have
    different mean lengths) -> (P,) float32 on ``work``'s device.
    """
    if work.dim() != 1 or work.numel() == 0:
        raise ValueError(f"work must be a non-empty 1-d tensor, but got shape {tuple(work.shape)}")
    if kind.shape != work.shape or kind.dtype != torch.long:
        raise ValueError(f"kind must be an int64 tensor of work's shape {tuple(work.shape)}, but got shape "
                         f"{tuple(kind.shape)} and dtype {kind.dtype}")
    if bool((kind < 0).any()):
        raise ValueError(f"kind must be >= 0, but its minimum is {int(kind.min())}")
    if not bool(torch.isfinite(work).all()) or bool((work < 0).any()):
        raise ValueError("work must be finite and >= 0")
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ValueError(f"slots must be an int >= 1, but got {slots!r}")
    w = work.double().cpu()
    free = [0.0] * max(1, min(slots, w.numel()))
    starts = []
    for x in w.tolist():
        starts.append(heapq.heapreplace(free, free[0] + x))
    kind = kind.cpu()
    count = torch.zeros(int(kind.max()) + 1, dtype=torch.float64).index_add_(0, kind, torch.ones_like(w))
    period = torch.zeros_like(count).index_add_(0, kind, w) / count.clamp_min(1)
    phase = torch.frac(torch.tensor(starts, dtype=torch.float64) / period[kind].clamp_min(1e-9))
    return phase.float().to(work.device)


def _slots(device: torch.device) -> int:
    """Programs that run at once: one per multiprocessor (the kernels' shared memory holds no more at
    the GPU tiles); 2 in the interpreter, so that CPU tests walk from phases other than 0."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def _per_head(num: torch.Tensor, h: int) -> torch.Tensor:
    return num.expand(h, -1) if num.shape[0] == 1 else num


def _fwd_phases(lists: TritonLists, b: int, h: int, n: int, block_size: int, ts: TileSettings,
                device: torch.device) -> torch.Tensor:
    """Phases of the forward's programs (:func:`start_phases`)."""
    rows = torch.arange(_cdiv(n, ts.fwd_m), device=lists.kv_full_num.device) * ts.fwd_m // block_size
    blocks = _per_head(lists.kv_part_num + lists.kv_full_num, h)[:, rows].double()  # (h, q tiles)
    work = (blocks * (block_size // ts.fwd_n) + 1).repeat(b, 1).flatten()  # + 1: the program's own loads
    return start_phases(work, torch.zeros(work.numel(), dtype=torch.long), _slots(device))


def _bwd_phases(lists: TritonLists, b: int, h: int, h_kv: int, n: int, block_size: int, ts: TileSettings,
                which: str, device: torch.device) -> torch.Tensor:
    """Phases of a backward launch of dK/dV programs (``which`` "kv"), dQ programs ("q") or both."""
    group = h // h_kv
    dev = lists.kv_full_num.device
    # work in products of tiles: dK/dV steps make 4 of m1 x n1, dQ steps 3 of m2 x n2
    cols = torch.arange(_cdiv(n, ts.bwd_n1), device=dev) * ts.bwd_n1 // block_size
    per_col = _per_head(lists.q_part_num + lists.q_full_num, h)[:, cols].double()  # (h, kv tiles)
    kv_work = per_col.view(h_kv, group, -1).sum(1) * (block_size // ts.bwd_m1) * 4
    kv_work = (kv_work + 1) * ts.bwd_m1 * ts.bwd_n1  # (h_kv, kv tiles)
    parts, kinds = [], []
    if which != "q":
        parts.append(kv_work)
        kinds.append(torch.zeros_like(kv_work, dtype=torch.long))
    if which != "kv":
        rows = torch.arange(_cdiv(n, ts.bwd_m2), device=dev) * ts.bwd_m2 // block_size
        per_row = _per_head(lists.kv_part_num + lists.kv_full_num, h)[:, rows].double()  # (h, q tiles)
        q_work = (per_row * (block_size // ts.bwd_n2) * 3 + 1) * ts.bwd_m2 * ts.bwd_n2
        parts.append(q_work.reshape(h_kv, -1))  # (h_kv, group * q tiles): the programs of each kv head
        kinds.append(torch.ones_like(parts[-1], dtype=torch.long))
    work = torch.cat(parts, 1).repeat(b, 1).flatten()
    kind = torch.cat(kinds, 1).repeat(b, 1).flatten()
    return start_phases(work, kind, _slots(device))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _settings(tiles: list[int]) -> TileSettings:
    return TileSettings(*tiles[:10], bool(tiles[10]), bool(tiles[11]))


def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: torch.Tensor, block_size: int,
            is_causal: bool, scale: float, loads: Optional[str], tiles: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``dilated_attention::block_sparse_fwd``: (out (b, n, h, d) contiguous, lse (b, h, n) float32). The
    layout's lists and the programs' phases come from the metadata LRU; ``tiles`` is a
    :class:`TileSettings` as ints."""
    return _forward(q, k, v, layout, block_size, is_causal, scale, loads, _settings(tiles))


def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
            dout: torch.Tensor, dlse: Optional[torch.Tensor], layout: torch.Tensor, block_size: int, is_causal: bool,
            scale: float, loads: Optional[str], tiles: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dilated_attention::block_sparse_bwd``: (dq, dk, dv), contiguous; ``dlse`` None: no LSE gradient."""
    return _backward(q, k, v, out, lse, dout, dlse, layout, block_size, is_causal, scale, loads, _settings(tiles))


FWD_OP = torch.library.custom_op("dilated_attention::block_sparse_fwd", _fwd_op, mutates_args=())
BWD_OP = torch.library.custom_op("dilated_attention::block_sparse_bwd", _bwd_op, mutates_args=())


@FWD_OP.register_fake
def _(q, k, v, layout, block_size, is_causal, scale, loads, tiles):
    b, n, h, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(b, h, n, dtype=torch.float32)


@BWD_OP.register_fake
def _(q, k, v, out, lse, dout, dlse, layout, block_size, is_causal, scale, loads, tiles):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


class _BlockSparseTriton(torch.autograd.Function):
    """The two ops as one differentiable call. Eager calls run the ops' Python bodies directly (the
    dispatcher's round trip into a Python op costs tens of microseconds of host time); traced code
    calls the ops, which a compiled graph then holds."""

    @staticmethod
    def forward(ctx, q, k, v, layout, block_size, is_causal, scale, loads, tiles):
        q, k, v = (_unit_last(x) for x in (q, k, v))
        settings = (layout, block_size, is_causal, scale, loads, list(tiles))
        out, lse = (FWD_OP if torch.compiler.is_compiling() else _fwd_op)(q, k, v, *settings)
        ctx.save_for_backward(q, k, v, out, lse, layout)
        ctx.settings = settings[1:]
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, layout = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        bwd = BWD_OP if torch.compiler.is_compiling() else _bwd_op
        return *bwd(q, k, v, out, lse, dout, dlse, layout, *ctx.settings), None, None, None, None, None, None


def triton_block_sparse_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: torch.Tensor, *, block_size: int,
    is_causal: bool, scale: float, loads: Optional[str] = None, tiles: Optional[TileSettings] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out (b, n, h, d), lse (b, h, n) float32). ``layout``: a validated bool ``(H, nb, nb)`` layout
    (its :func:`layout_lists` are made once and cached). ``loads``: how tiles are loaded, one of
    :data:`LOADS` or None for the best the device and inputs allow (see :func:`_loads_for`). ``tiles``:
    launch settings, default :func:`tile_settings`."""
    if loads is not None and loads not in LOADS:
        raise ValueError(f"loads must be None or one of {LOADS}, but got {loads!r}")
    if tiles is None:
        tiles = tile_settings(query.shape[-1], query.device)
    if block_size % max(tiles.fwd_m, tiles.fwd_n, tiles.bwd_m1, tiles.bwd_n1, tiles.bwd_m2, tiles.bwd_n2):
        raise ValueError(f"block_size ({block_size}) must be a multiple of every tile of {tiles}")
    return _BlockSparseTriton.apply(query, key, value, layout, block_size, is_causal, scale, loads,
                                    tuple(int(x) for x in astuple(tiles)))
