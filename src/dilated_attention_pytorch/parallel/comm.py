"""Process-group helpers shared by the sequence-parallel paths: group resolution, a bounded-time check
that every rank called with the same shapes and settings, and point-to-point exchange with byte counts."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["CommStats", "DEFAULT_CHECK_TIMEOUT_S", "agree_or_raise", "config_digest", "float_bits", "resolve_group"]

# How long a rank waits for the others at the start of a call before it raises instead of hanging.
DEFAULT_CHECK_TIMEOUT_S = 300.0

_DTYPE_CODES = {
    torch.float64: 1, torch.float32: 2, torch.float16: 3, torch.bfloat16: 4,
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
        raise RuntimeError(
            f"{what} needs an initialized torch.distributed process group, but none is initialized; call "
            "torch.distributed.init_process_group (e.g. under torchrun) or use dilated_attention on one device"
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


def config_digest(*parts: Any) -> int:
    """A stable 32-bit digest of settings (Python's ``hash`` differs between processes)."""
    return zlib.crc32(repr(parts).encode())


def float_bits(x: Optional[float]) -> int:
    """A float as a signed 64-bit int (exact comparison across ranks); None -> -1."""
    if x is None:
        return -1
    return int.from_bytes(struct.pack("<d", float(x)), "little", signed=True)


def dtype_code(dtype: Any) -> int:
    return _DTYPE_CODES.get(dtype, 99)


def agree_or_raise(
    what: str,
    fields: dict[str, int],
    local_error: Optional[BaseException],
    group: Any,
    device: torch.device,
    timeout_s: float = DEFAULT_CHECK_TIMEOUT_S,
    describe: Optional[dict[str, Callable[[int], str]]] = None,
) -> list[dict[str, int]]:
    """All-gather a small fingerprint of every rank's call; raise on every rank if any rank's inputs were
    invalid or the ranks disagree. Returns every rank's fields when they agree.

    Every rank must reach this point (local errors are carried in the fingerprint, never raised early),
    so a bad input on one rank gives a clear error on all ranks instead of a hang. A rank that never
    arrives makes the others raise after ``timeout_s`` seconds.
    """
    names = list(fields)
    mine = torch.tensor([1 if local_error is not None else 0] + [int(fields[k]) for k in names], dtype=torch.int64)
    mine = mine.to(device)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    work = dist.all_gather(gathered, mine, group=group, async_op=True)
    try:
        work.wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError as err:  # DistBackendError and timeouts are RuntimeErrors
        raise RuntimeError(
            f"{what}: not every rank of the process group reached the call within {timeout_s:.0f} s "
            f"(every rank must call it with its shard); underlying error: {err}"
        ) from err
    table = torch.stack(gathered).cpu().tolist()
    bad = [r for r, row in enumerate(table) if row[0] != 0]
    if bad:
        if local_error is not None:
            raise type(local_error)(f"{local_error} (on rank {dist.get_rank(group)}; ranks with invalid inputs: {bad})")
        raise ValueError(f"{what}: rank(s) {bad} passed invalid inputs (their error says why); no rank ran the call")
    rows = [dict(zip(names, row[1:])) for row in table]
    describe = describe or {}
    for name in names:
        values = [row[name] for row in rows]
        if any(v != values[0] for v in values):
            shown = [describe[name](v) if name in describe else v for v in values]
            raise ValueError(f"{what}: every rank must pass the same {name}, but got per rank {shown}")
    return rows


def exchange(
    sends: Sequence[tuple[int, torch.Tensor]], recvs: Sequence[tuple[int, torch.Tensor]], group: Any
) -> list:
    """Post point-to-point sends and receives (peers are ranks in ``group``); returns works to wait on."""
    ops = []
    for peer, buf in sends:
        ops.append(dist.P2POp(dist.isend, buf, dist.get_global_rank(group, peer), group))
    for peer, buf in recvs:
        ops.append(dist.P2POp(dist.irecv, buf, dist.get_global_rank(group, peer), group))
    if not ops:
        return []
    return dist.batch_isend_irecv(ops)


def wait_all(works: list) -> None:
    for work in works:
        work.wait()
