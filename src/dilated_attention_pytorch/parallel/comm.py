"""Process-group helpers shared by the sequence-parallel paths: group resolution, a bounded-time check
that every rank called the same strategy with the same shapes and settings, and waits on transfers
that raise a clear error within a bound instead of hanging (on the CPU; on a GPU the process group's
own timeout bounds them, see :func:`wait_transfers`)."""

from __future__ import annotations

import hashlib
import json
import numbers
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Generic, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "Agreed",
    "CommStats",
    "DEFAULT_CHECK_TIMEOUT_S",
    "DEFAULT_TIMEOUT_S",
    "STRATEGIES",
    "agree_call",
    "agree_or_raise",
    "call_settings",
    "check_timeout",
    "exchange",
    "post",
    "resolve_group",
    "resolve_timeout",
    "wait_bounded",
    "wait_transfers",
]

# How long a rank waits for the others (at the agreement check, and on the CPU at every later transfer of
# a call) before it raises instead of hanging.
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_CHECK_TIMEOUT_S = DEFAULT_TIMEOUT_S  # the former name, kept for compatibility

# Sequence-parallel strategies, in the order of their codes in the agreement header (code = index + 1).
STRATEGIES = ("ring", "head_parallel", "block_sparse")
_STRATEGY_NAMES = {
    "ring": "ring (ring_dilated_attention / RingDilatedAttention)",
    "head_parallel": "head-parallel (head_parallel_dilated_attention / DistributedImprovedDilatedAttention)",
    "block_sparse": "block-sparse (BlockSparseRingDistributedDilatedAttention)",
}


@dataclass
class CommStats:
    """Bytes and messages this rank sent and received, summed over the calls it took part in.

    Pass one to ``stats=`` (or read a module's ``.stats``); ``reset()`` starts counting anew.
    """

    calls: int = 0
    local_only_calls: int = 0  # calls that needed no communication of keys/values at all
    forward_bytes_sent: int = 0
    backward_bytes_sent: int = 0
    forward_bytes_received: int = 0
    backward_bytes_received: int = 0
    messages_sent: int = 0

    @property
    def bytes_sent(self) -> int:
        return self.forward_bytes_sent + self.backward_bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.forward_bytes_received + self.backward_bytes_received

    def reset(self) -> None:
        fresh = CommStats()
        for name in fresh.__dataclass_fields__:
            setattr(self, name, getattr(fresh, name))

    def as_dict(self) -> dict:
        d = {name: getattr(self, name) for name in self.__dataclass_fields__}
        d["bytes_sent"], d["bytes_received"] = self.bytes_sent, self.bytes_received
        return d


def resolve_group(process_group: Any, what: str) -> tuple[Any, int, int]:
    """-> (group, rank in group, world size). ``None`` means the default (world) group."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            f"{what} needs an initialised torch.distributed process group (process_group=None means the "
            "default group), but none is initialised; call torch.distributed.init_process_group (e.g. under "
            "torchrun), or use the single-device form (dilated_attention / DilatedAttention) on whole sequences"
        )
    group = dist.group.WORLD if process_group is None else process_group
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup or None, but got {type(group).__name__}"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{what}: this process is not a member of the given process_group")
    return group, rank, dist.get_world_size(group)


def collective_device(group: Any, like: Optional[torch.Tensor]) -> torch.device:
    """Device for small control tensors: the inputs' device, or the group backend's natural one."""
    if isinstance(like, torch.Tensor):
        return like.device
    backend = str(dist.get_backend(group))
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- the timeout -----------------------------------------------------------------------------------
def check_timeout(value: Any, name: str = "timeout_s") -> float:
    """A timeout in seconds: a finite positive number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds, but got {value!r} of type {type(value).__name__}")
    if not 0.0 < float(value) < float("inf"):
        raise ValueError(f"{name} must be a finite positive number of seconds, but got {value!r}")
    return float(value)


def resolve_timeout(timeout_s: Any, check_timeout_s: Any = None, stacklevel: int = 3) -> float:
    """``timeout_s``, or the deprecated ``check_timeout_s`` in its place; validated. ``stacklevel``: that
    of the user's call, seen from here."""
    if check_timeout_s is not None:
        if timeout_s != DEFAULT_TIMEOUT_S:
            raise TypeError("pass timeout_s only (check_timeout_s is its deprecated former name), not both")
        warnings.warn(
            "check_timeout_s is deprecated: use timeout_s, which bounds the agreement check and every later "
            "wait of the call", DeprecationWarning, stacklevel=stacklevel,
        )
        timeout_s = check_timeout_s
    return check_timeout(timeout_s)


def wait_transfers(works: Sequence[tuple[Any, str]], what: str, timeout_s: float, device: torch.device) -> None:
    """Wait for a call's transfers of tensors on ``device``: bounded by ``timeout_s`` on the CPU (gloo),
    see :func:`wait_bounded`; stream-ordered on a GPU (NCCL), where the host goes on queueing work.

    A bounded wait on a GPU (``Work.wait(timeout)``) blocks the host until each transfer has finished,
    polling every millisecond (idle GPU time per wait: BENCHMARKS.md), so there these waits are bounded
    by the process group's own timeout instead (``init_process_group`` / ``new_group(timeout=...)``),
    which NCCL's watchdog enforces by aborting with an error that names the collective.
    """
    if device.type == "cpu":
        wait_bounded(works, what, timeout_s)
        return
    for work, _ in works:
        work.wait()


def _peer_failure(what: str, event: str, err: BaseException) -> RuntimeError:
    return RuntimeError(
        f"{what}: {event}: a rank failed, exited or stopped taking part after the ranks agreed on the call "
        "(every rank must run the whole call, forward and backward). The process group is not usable after "
        f"this error; underlying error: {type(err).__name__}: {err}"
    )


def post(what: str, transfer: str, start: Callable[[], Any]) -> Any:
    """``start()`` (which posts ``transfer`` and returns its work); a peer that already left makes it
    raise a ``RuntimeError`` that says so."""
    try:
        return start()
    except RuntimeError as err:  # DistBackendError: e.g. the connection to a rank that exited is gone
        raise _peer_failure(what, f"{transfer} could not be started", err) from err


def wait_bounded(works: Sequence[tuple[Any, str]], what: str, timeout_s: float) -> None:
    """Wait on the host for every ``(work, what it is)``; if one fails or does not complete within
    ``timeout_s`` seconds in total, raise a ``RuntimeError`` that names it and the bound."""
    deadline = time.monotonic() + timeout_s
    for work, waiting_for in works:
        start = time.monotonic()
        remaining = max(deadline - start, 1e-3)
        try:
            work.wait(timeout=timedelta(seconds=remaining))
        except RuntimeError as err:  # DistBackendError and gloo/NCCL timeouts are RuntimeErrors
            waited = time.monotonic() - start
            how = (
                f"did not complete within timeout_s={timeout_s:g} s" if waited >= 0.99 * remaining
                else f"failed after {waited:.1f} s (timeout_s={timeout_s:g} s)"
            )
            raise _peer_failure(what, f"{waiting_for} {how}", err) from err


def exchange(
    sends: Sequence[tuple[int, torch.Tensor]], recvs: Sequence[tuple[int, torch.Tensor]], group: Any, what: str,
    transfer: str,
) -> list[tuple[Any, str]]:
    """Post point-to-point sends and receives of ``transfer`` (peers are ranks in ``group``) for the call
    ``what``; returns ``(work, what it is)`` pairs for :func:`wait_transfers`."""
    ops, named = [], []
    for peer, buf in sends:
        ops.append(dist.P2POp(dist.isend, buf, dist.get_global_rank(group, peer), group))
        named.append(f"sending {transfer} to rank {peer}")
    for peer, buf in recvs:
        ops.append(dist.P2POp(dist.irecv, buf, dist.get_global_rank(group, peer), group))
        named.append(f"receiving {transfer} from rank {peer}")
    if not ops:
        return []
    works = post(what, " and ".join(named), lambda: dist.batch_isend_irecv(ops))
    if len(works) == len(ops):  # one work per operation (gloo)
        return list(zip(works, named))
    # coalesced (NCCL): one work for the whole batch
    return [(work, " and ".join(named)) for work in works]


# -- agreement -------------------------------------------------------------------------------------
def _canonical(value: Any) -> str:
    """A setting as text that compares equal across ranks exactly when the settings are equal."""
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, (list, tuple, torch.Size)):
        return "(" + ", ".join(_canonical(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)  # a float's repr round-trips exactly


def call_settings(query: Any, key: Any, **settings: Any) -> dict[str, Any]:
    """The settings ranks must agree on: the shard's shapes and dtype (from ``query``/``key``, whatever
    they are), then ``settings`` as given."""
    b, n_local, h, d = query.shape if isinstance(query, torch.Tensor) and query.dim() == 4 else (None,) * 4
    kv_heads = key.shape[2] if isinstance(key, torch.Tensor) and key.dim() == 4 else None
    return {
        "batch": b, "n_local (shard length)": n_local, "heads": h, "kv_heads": kv_heads, "head_dim": d,
        "dtype": getattr(query, "dtype", None), **settings,
    }


def _post_all_gather(mine: torch.Tensor, group: Any, world: int) -> tuple[Any, list[torch.Tensor]]:
    gathered = [torch.empty_like(mine) for _ in range(world)]
    return dist.all_gather(gathered, mine, group=group, async_op=True), gathered


def agree_or_raise(
    what: str,
    strategy: str,
    settings: dict[str, Any],
    local_error: Optional[BaseException],
    group: Any,
    device: torch.device,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Check that every rank called the same ``strategy`` with equal ``settings``; raise on every rank
    otherwise, or if any rank's inputs were invalid (``local_error``).

    Every rank must reach this point (local errors are carried in the header, never raised early), so a
    bad input on one rank gives a clear error on all ranks instead of a hang. One all-gather of a fixed
    size header (error flag, strategy code, length and 64-bit digest of the settings) decides; only when
    digests differ does a second all-gather bring every rank's settings as text, so the error names each
    differing setting with its value on every rank. A rank that never arrives makes the others raise
    after ``timeout_s`` seconds.
    """
    code = STRATEGIES.index(strategy) + 1
    payload = b"" if local_error is not None else json.dumps(
        [[name, _canonical(value)] for name, value in settings.items()]
    ).encode()
    digest = int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little", signed=True)
    header = torch.tensor([int(local_error is not None), code, len(payload), digest], dtype=torch.int64)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    work, table = _post_all_gather(header.to(device), group, world)
    try:
        work.wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError as err:  # DistBackendError and timeouts are RuntimeErrors
        raise RuntimeError(
            f"{what}: not every rank of the process group reached the call within {timeout_s:g} s (every rank "
            f"must call it with its shard); underlying error: {type(err).__name__}: {err}"
        ) from err
    rows = torch.stack(table).cpu().tolist()  # per rank: [error, strategy code, payload length, digest]
    codes = [row[1] for row in rows]
    if any(c != code for c in codes):
        names = [_STRATEGY_NAMES[STRATEGIES[c - 1]] if 1 <= c <= len(STRATEGIES) else f"unknown strategy {c}"
                 for c in codes]
        raise ValueError(
            f"{what}: every rank must call the same sequence-parallel strategy, but got "
            + "; ".join(f"rank {r}: {n}" for r, n in enumerate(names))
        ) from local_error
    bad = [r for r, row in enumerate(rows) if row[0] != 0]
    if bad:
        if local_error is not None:
            raise type(local_error)(f"{local_error} (on rank {rank}; ranks with invalid inputs: {bad})")
        raise ValueError(f"{what}: rank(s) {bad} passed invalid inputs (their error says why); no rank ran the call")
    if all(row[2:] == rows[0][2:] for row in rows):
        return
    # The settings differ: gather them as text (padded to the longest) and name the differences.
    longest = max(row[2] for row in rows)
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[: len(payload)] = torch.tensor(list(payload), dtype=torch.uint8)
    work, texts = _post_all_gather(mine.to(device), group, world)
    wait_bounded([(work, "gathering every rank's settings")], what, timeout_s)
    per_rank = [dict(json.loads(bytes(t.cpu()[: row[2]].tolist()).decode())) for t, row in zip(texts, rows)]
    differ = []
    for name in dict.fromkeys(k for d in per_rank for k in d):
        values = [d.get(name, "-") for d in per_rank]
        if any(v != values[0] for v in values):
            differ.append(f"{name} per rank [{', '.join(values)}]")
    raise ValueError(
        f"{what}: every rank must pass the same shapes and settings, but "
        + ("; ".join(differ) or "their settings differ")
    )


# -- the preamble of every sequence-parallel call ----------------------------------------------------
T = TypeVar("T")


@dataclass(frozen=True)
class Agreed(Generic[T]):
    """A sequence-parallel call that every rank agreed on: its process group, this rank, the bound on
    every wait, and the call's checked arguments."""

    group: Any
    rank: int
    world: int
    timeout_s: float
    args: T


def agree_call(
    what: str,
    strategy: str,
    process_group: Any,
    query: Any,
    key: Any,
    check: Callable[[int], T],
    settings: Callable[[T], dict[str, Any]],
    timeout_s: Any,
    check_timeout_s: Any = None,
    stats: Any = None,
    stacklevel: int = 4,
) -> Agreed[T]:
    """Resolve the process group, check this rank's call, and agree on it with every rank.

    ``check(world)`` checks the call's arguments and returns them (it raises ``TypeError`` or
    ``ValueError``); ``settings(args)`` are the values every rank must share, beside the shard's
    shapes and dtype. An invalid call, timeout or ``stats`` on any rank raises on every rank (the
    error is carried in the agreement, never raised before it), so a bad input gives a clear error
    instead of a hang; see :func:`agree_or_raise`. ``stacklevel``: that of the user's call, seen from
    the deprecation warning of ``check_timeout_s``."""
    group, rank, world = resolve_group(process_group, what)
    local_error: Optional[BaseException] = None
    try:
        timeout_s = resolve_timeout(timeout_s, check_timeout_s, stacklevel)
    except (TypeError, ValueError) as err:
        local_error, timeout_s = err, DEFAULT_TIMEOUT_S
    args = None
    try:
        if stats is not None and not isinstance(stats, CommStats):
            raise TypeError(f"stats must be a CommStats or None, but got {type(stats).__name__}")
        args = check(world)
    except (TypeError, ValueError) as err:  # reported to every rank below, then raised here
        local_error = local_error or err
    agreed = call_settings(query, key, **({} if args is None else settings(args)))
    agree_or_raise(what, strategy, agreed, local_error, group, collective_device(group, query), timeout_s)
    return Agreed(group, rank, world, timeout_s, args)
