"""``create_dilated_attention`` / ``create_multihead_dilated_attention``: build any attention family by name.

Classes are imported lazily from a registry, so a family whose module is missing (or whose optional
dependency is not installed) fails only when asked for, with an error that says which. ``"auto"`` picks
a single-device family from the environment and :func:`explain_auto` says why: sequence parallelism
(``"ring"``, ``"distributed"``) is used only when asked for, by name or by passing ``process_group=``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch

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


@dataclass(frozen=True)
class _Route:
    module: str
    attention: str
    multihead: str
    needs: str  # what the family is for, shown by `info`


_PKG = "dilated_attention_pytorch"
_REGISTRY: dict[str, _Route] = {
    "standard": _Route(f"{_PKG}.attention", "DilatedAttention", "MultiheadDilatedAttention", "any device"),
    "improved": _Route(f"{_PKG}.improved", "ImprovedDilatedAttention", "ImprovedMultiheadDilatedAttention",
                       "fastest single-device kernel"),
    "ring": _Route(f"{_PKG}.parallel.ring", "RingDilatedAttention", "RingMultiheadDilatedAttention",
                   "sequence shards over a process group"),
    "distributed": _Route(f"{_PKG}.parallel.head_parallel", "DistributedImprovedDilatedAttention",
                          "DistributedImprovedMultiheadDilatedAttention", "head-parallel multi-node training"),
    "block_sparse": _Route(f"{_PKG}.block_sparse", "BlockSparseRingDilatedAttention",
                           "BlockSparseRingMultiheadDilatedAttention", "block-sparse attention"),
}
# The multihead standard class lives in its own module.
_MULTIHEAD_MODULE = {"standard": f"{_PKG}.multihead"}

ATTENTION_TYPES = ("auto", *_REGISTRY)


def _check_type(attention_type: Any) -> str:
    if not isinstance(attention_type, str) or attention_type not in ATTENTION_TYPES:
        raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}, but got {attention_type!r}")
    return attention_type


def _module_exists(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it."""
    parent = name.rpartition(".")[0]
    if parent and not _module_exists(parent):
        return False
    return importlib.util.find_spec(name) is not None


def attention_class(attention_type: str, *, multihead: bool = False) -> type:
    """The class registered for a concrete ``attention_type`` (imports its module)."""
    attention_type = _check_type(attention_type)
    if attention_type == "auto":
        raise ValueError("attention_class needs a concrete attention_type; resolve 'auto' with explain_auto()")
    route = _REGISTRY[attention_type]
    module_name = _MULTIHEAD_MODULE.get(attention_type, route.module) if multihead else route.module
    if not _module_exists(module_name):
        raise ImportError(
            f"attention_type={attention_type!r} needs module {module_name}, which is not part of this installation"
        )
    return getattr(importlib.import_module(module_name), route.multihead if multihead else route.attention)


def route_status() -> dict[str, tuple[bool, str]]:
    """For each named type: (module present, what it is for or why it is missing). Imports nothing heavy."""
    status = {}
    for name, route in _REGISTRY.items():
        present = _module_exists(route.module)
        status[name] = (present, route.needs if present else f"module {route.module} is not installed")
    return status


# -- auto ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AutoChoice:
    """What ``"auto"`` resolves to here, and the reasons, in the order they were checked."""

    attention_type: str
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        return f"auto -> {self.attention_type}: " + "; ".join(self.reasons)


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
    for); otherwise a single-device type: a CUDA GPU whose fused kernel supports the inputs and the
    ``improved`` module present -> ``"improved"``; else ``"standard"``. An initialised process group never
    turns on sequence parallelism by itself: under data parallelism (DDP, FSDP) every rank holds whole
    sequences, and treating them as shards of one sequence would be silently wrong; ask for ``"ring"`` or
    ``"distributed"`` by name. ``device``, ``dtype``, ``head_dim`` describe the inputs when known (default:
    the current CUDA device if any; bfloat16; 64). ``single_device`` is kept for compatibility (``"auto"``
    is always single-device unless a ``process_group`` is passed)."""
    from .kernels import FUSED_KERNELS, BlockInputs, kernel_reasons

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
    if device_type != "cuda":
        reasons.append("no CUDA GPU" if device is None else f"inputs on {device_type}, not cuda")
        reasons.append("the portable path runs everywhere")
        return AutoChoice("standard", tuple(reasons))
    if device is not None and not torch.cuda.is_available():
        reasons.append("device cuda requested but torch.cuda.is_available() is False")
        return AutoChoice("standard", tuple(reasons))
    inputs = BlockInputs("cuda", dtype or torch.bfloat16, head_dim or 64, False, False, False)
    assumed = [] if dtype is not None and head_dim is not None else [
        f"assuming dtype={inputs.dtype} and head_dim={inputs.head_dim} (pass dtype=/head_dim= to check others)"
    ]
    fused = kernel_reasons(inputs, FUSED_KERNELS)
    if all(fused.values()):
        why = "; ".join(f"{name}: {', '.join(r)}" for name, r in fused.items())
        reasons += assumed + [f"no fused CUDA kernel can run these inputs ({why})"]
        return AutoChoice("standard", tuple(reasons))
    improved = _REGISTRY["improved"].module
    if not _module_exists(improved):
        reasons += [f"module {improved} is not installed", "the portable path uses the fused kernel per block"]
        return AutoChoice("standard", tuple(reasons))
    usable = [name for name, r in fused.items() if not r]
    reasons += assumed + [f"CUDA GPU with a fused kernel that supports the inputs ({', '.join(usable)})"]
    return AutoChoice("improved", tuple(reasons))


# -- construction ----------------------------------------------------------------------------------
def _accepted(cls: type) -> tuple[list[str], bool]:
    """Constructor keyword names of ``cls``, following ``**kwargs`` up the MRO to the base that takes them.
    Returns (names, whether arbitrary keywords are still accepted at the end of the chain)."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass in (torch.nn.Module, object):
            continue
        params = list(inspect.signature(klass.__init__).parameters.values())[1:]  # drop self
        names += [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in names]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names, False
    return names, True


def _build(attention_type: str, multihead: bool, args: tuple, kwargs: dict) -> torch.nn.Module:
    cls = attention_class(attention_type, multihead=multihead)
    names, open_kwargs = _accepted(cls)
    unknown = sorted(set(kwargs) - set(names))
    if unknown and not open_kwargs:
        raise TypeError(
            f"{cls.__name__} (attention_type={attention_type!r}) got unexpected keyword argument(s) {unknown}; "
            f"accepted: {names}"
        )
    try:
        inspect.signature(cls).bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(f"{cls.__name__} (attention_type={attention_type!r}): {err}; accepted: {names}") from None
    return cls(*args, **kwargs)


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


def create_block_sparse_attention(*args: Any, **kwargs: Any) -> torch.nn.Module:
    """The block-sparse family's own factory (``multihead=``, ``distributed=``), imported lazily:
    :func:`dilated_attention_pytorch.block_sparse.create_block_sparse_attention`."""
    module = _REGISTRY["block_sparse"].module
    if not _module_exists(module):
        raise ImportError(
            f"create_block_sparse_attention needs module {module}, which is not part of this installation"
        )
    return importlib.import_module(module).create_block_sparse_attention(*args, **kwargs)
