"""``create_dilated_attention`` / ``create_multihead_dilated_attention``: build any attention family by name.

``"auto"`` picks a single-device family from the environment and :func:`explain_auto` says why: sequence
parallelism (``"ring"``, ``"distributed"``) is used only when asked for, by name or by passing
``process_group=``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import _validation as V
from .attention import BaseDilatedAttention, DilatedAttention
from .backends import FUSED, backend_table
from .block_sparse.modules import BlockSparseRingDilatedAttention, BlockSparseRingMultiheadDilatedAttention
from .kernels import BlockInputs
from .improved import ImprovedDilatedAttention, ImprovedMultiheadDilatedAttention
from .multihead import BaseMultiheadDilatedAttention, MultiheadDilatedAttention
from .parallel.block_sparse import BlockSparseRingDistributedDilatedAttention
from .parallel.head_parallel import DistributedImprovedDilatedAttention, DistributedImprovedMultiheadDilatedAttention
from .parallel.ring import RingDilatedAttention, RingMultiheadDilatedAttention

__all__ = [
    "ATTENTION_TYPES",
    "AutoChoice",
    "attention_class",
    "create_block_sparse_attention",
    "create_dilated_attention",
    "create_multihead_dilated_attention",
    "explain_auto",
    "route_status",
]

# attention type -> (core class, multihead class, what it is for)
_REGISTRY: dict[str, tuple[type, type, str]] = {
    "standard": (DilatedAttention, MultiheadDilatedAttention, "any device"),
    "improved": (ImprovedDilatedAttention, ImprovedMultiheadDilatedAttention, "fastest single-device kernel"),
    "ring": (RingDilatedAttention, RingMultiheadDilatedAttention, "sequence shards over a process group"),
    "distributed": (DistributedImprovedDilatedAttention, DistributedImprovedMultiheadDilatedAttention,
                    "head-parallel multi-node training"),
    "block_sparse": (BlockSparseRingDilatedAttention, BlockSparseRingMultiheadDilatedAttention,
                     "block-sparse attention"),
}

ATTENTION_TYPES = ("auto", *_REGISTRY)


def _check_type(attention_type: Any) -> str:
    return V.check_choice("attention_type", attention_type, ATTENTION_TYPES)


def attention_class(attention_type: str, *, multihead: bool = False) -> type:
    """The class registered for a concrete ``attention_type``."""
    if _check_type(attention_type) == "auto":
        raise ValueError("attention_class needs a concrete attention_type; resolve 'auto' with explain_auto()")
    return _REGISTRY[attention_type][1 if multihead else 0]


def route_status() -> dict[str, tuple[bool, str]]:
    """For each named type: (available, what it is for)."""
    return {name: (True, needs) for name, (_, _, needs) in _REGISTRY.items()}


# -- auto ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AutoChoice:
    """What ``"auto"`` resolves to here, and the reasons, in the order they were checked."""

    attention_type: str
    reasons: tuple[str, ...]
    inputs: Optional[BlockInputs] = None  # the single-device inputs it decided for

    def __str__(self) -> str:
        return f"auto -> {self.attention_type}: " + "; ".join(self.reasons)

    def table(self) -> str:
        """The dilated backends and block kernels with their reasons against the inputs it decided for."""
        return backend_table(self.inputs)


def _process_group_size() -> Optional[int]:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None
    return dist.get_world_size()


def explain_auto(
    *,
    device: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    head_dim: Optional[int] = None,
    single_device: bool = False,
    process_group: Any = None,
) -> AutoChoice:
    """Resolve ``"auto"``: ``"ring"`` only when a ``process_group`` is passed (sequence parallelism asked
    for); otherwise a single-device type: a CUDA GPU where the fused backend supports the inputs ->
    ``"improved"``; else ``"standard"`` (``.table()`` of the choice: every backend's reasons). An initialised
    process group never
    turns on sequence parallelism by itself: under data parallelism (DDP, FSDP) every rank holds whole
    sequences, and treating them as shards of one sequence would be silently wrong; ask for ``"ring"`` or
    ``"distributed"`` by name. ``device``, ``dtype``, ``head_dim`` describe the inputs when known (default:
    the current CUDA device if any; bfloat16; 64). ``single_device`` is kept for compatibility (``"auto"``
    is always single-device unless a ``process_group`` is passed)."""
    reasons = []
    if process_group is not None:
        import torch.distributed as dist

        if single_device:
            raise ValueError(
                "single_device=True (whole sequences) and a process_group (sequence shards) contradict each "
                "other; pass one of them"
            )
        if not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(
                f"process_group must be a torch.distributed.ProcessGroup, but got {type(process_group).__name__}"
            )
        size = dist.get_world_size(process_group)
        reasons.append(
            f"process_group= (of {size} rank{'s' if size != 1 else ''}) was passed: sequence parallelism asked "
            "for, ring attention over that group (each rank passes its shard of the sequence)"
        )
        return AutoChoice("ring", tuple(reasons))
    world = _process_group_size()
    if single_device:
        reasons.append("single-device use (whole sequences)")
    if world is not None and world > 1:
        reasons.append(
            f"a process group of {world} ranks is initialised, but auto never turns on sequence parallelism "
            "(under data parallelism every rank holds whole sequences): pass 'ring' or 'distributed' (or "
            "process_group=) to shard sequences across ranks"
        )
    else:
        reasons.append("no initialised process group" if world is None else "the process group has 1 rank")
    device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    inputs = BlockInputs(device_type, dtype or torch.bfloat16, head_dim or 64, False, False, False)
    if device_type != "cuda":
        reasons += ["no CUDA GPU" if device is None else f"inputs on {device_type}, not cuda",
                    "the portable path runs everywhere"]
    elif not torch.cuda.is_available():
        reasons.append("device cuda requested but torch.cuda.is_available() is False")
    else:
        if dtype is None or head_dim is None:
            reasons.append(f"assuming dtype={inputs.dtype} and head_dim={inputs.head_dim} (pass dtype=/head_dim= to "
                           "check others)")
        fused = FUSED.not_supported_reasons(inputs)
        if not fused:
            reasons.append(f"CUDA GPU and the fused path ({FUSED.kernel.name} per block) supports the inputs")
            return AutoChoice("improved", tuple(reasons), inputs)
        reasons.append(f"the fused path cannot run these inputs ({'; '.join(fused)})")
    return AutoChoice("standard", tuple(reasons), inputs)


# -- construction ----------------------------------------------------------------------------------
def _keywords(cls: type) -> list[str]:
    """Keyword names ``cls`` accepts: those of its constructor, following ``**kwargs`` up the MRO, and for a
    multihead class the extra ones of its core class (after ``embed_dim, num_heads``)."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass in (torch.nn.Module, object):
            continue
        params = list(inspect.signature(klass.__init__).parameters.values())[1:]  # drop self
        names += [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in names]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    if issubclass(cls, BaseMultiheadDilatedAttention):
        shared = set(_keywords(BaseDilatedAttention)) | set(names)
        names[2:2] = [n for n in _keywords(cls.attention_class) if n not in shared]
    return names


def construct(cls: type, args: tuple, kwargs: dict, label: str = "") -> torch.nn.Module:
    """``cls(*args, **kwargs)``; an unknown keyword or a missing argument raises ``TypeError`` listing the
    accepted keywords."""
    names, what = _keywords(cls), cls.__name__ + (f" ({label})" if label else "")
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise TypeError(f"{what} got unexpected keyword argument(s) {unknown}; accepted: {names}")
    try:
        inspect.signature(cls).bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(f"{what}: {err}; accepted: {names}") from None
    return cls(*args, **kwargs)


def _build(attention_type: str, multihead: bool, args: tuple, kwargs: dict) -> torch.nn.Module:
    return construct(attention_class(attention_type, multihead=multihead), args, kwargs,
                     f"attention_type={attention_type!r}")


def _auto_hints(kwargs: dict, multihead: bool) -> dict:
    hints: dict[str, Any] = {}
    if multihead:
        if isinstance(kwargs.get("dtype"), torch.dtype):
            hints["dtype"] = kwargs["dtype"]
        if kwargs.get("device") is not None:
            hints["device"] = str(kwargs["device"])
        e, h = kwargs.get("embed_dim"), kwargs.get("num_heads")
        if isinstance(e, int) and isinstance(h, int) and h > 0 and e % h == 0:
            hints["head_dim"] = e // h
    return hints


def _resolve_auto(kwargs: dict, multihead: bool) -> str:
    """The type ``"auto"`` builds: ``"ring"`` when ``process_group=`` is passed, else single-device."""
    if "process_group" in kwargs and kwargs["process_group"] is None:
        raise ValueError(
            "attention_type='auto' with process_group=None is ambiguous: pass attention_type='ring' or "
            "'distributed' to shard sequences over the default process group, a process group to shard over "
            "that group, or no process_group for a single-device module"
        )
    return explain_auto(process_group=kwargs.get("process_group"), **_auto_hints(kwargs, multihead)).attention_type


def create_dilated_attention(attention_type: str = "auto", *args: Any, **kwargs: Any) -> torch.nn.Module:
    """Build a dilated-attention core ``(b, n, h, d) -> (b, n, h, d)`` of the given family.

    ``attention_type``: ``"standard"``, ``"improved"``, ``"ring"``, ``"distributed"``, ``"block_sparse"`` or
    ``"auto"`` (see :func:`explain_auto`: single-device, also under an initialised process group, unless
    ``process_group=`` is passed, which asks for ring attention over that group). Other arguments go to
    the class's constructor; an unknown keyword raises ``TypeError`` listing the accepted ones.
    """
    attention_type = _check_type(attention_type)
    if attention_type == "auto":
        attention_type = _resolve_auto(kwargs, False)
    return _build(attention_type, False, args, kwargs)


def create_multihead_dilated_attention(attention_type: str = "auto", *args: Any, **kwargs: Any) -> torch.nn.Module:
    """Build a multi-head module ``(b, n, embed_dim) -> ((b, n, embed_dim), None)`` of the given family
    (same types and ``"auto"`` rule as :func:`create_dilated_attention`; ``"auto"`` also uses ``embed_dim``,
    ``num_heads``, ``device`` and ``dtype`` when given as keywords)."""
    attention_type = _check_type(attention_type)
    if attention_type == "auto":
        attention_type = _resolve_auto(kwargs, True)
    return _build(attention_type, True, args, kwargs)


def create_block_sparse_attention(
    *args: Any, multihead: bool = False, distributed: bool = False, **kwargs: Any
) -> torch.nn.Module:
    """:class:`BlockSparseRingDilatedAttention`, or with ``multihead=True``
    :class:`BlockSparseRingMultiheadDilatedAttention`, or with ``distributed=True``
    :class:`BlockSparseRingDistributedDilatedAttention` (sequence-sharded). Other arguments go to the
    constructor; an unknown keyword raises TypeError listing the accepted ones."""
    multihead = V.check_bool("multihead", multihead)
    distributed = V.check_bool("distributed", distributed)
    if multihead and distributed:
        raise ValueError("multihead=True and distributed=True together are not available; choose one")
    cls = (
        BlockSparseRingMultiheadDilatedAttention if multihead
        else BlockSparseRingDistributedDilatedAttention if distributed
        else BlockSparseRingDilatedAttention
    )
    return construct(cls, args, kwargs)
