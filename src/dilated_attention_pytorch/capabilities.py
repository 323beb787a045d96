"""What every backend supports, as data: one :class:`Support` per backend, one
:func:`not_supported_reasons` over it, and one priority runner (:func:`first_supported`).

A backend (a dilated-attention backend, a block kernel, a block-sparse backend) declares a
``Support``; a call is described by a :class:`~dilated_attention_pytorch.kernels.BlockInputs`. The
dispatcher takes the first backend, in order of preference, with no reasons against the inputs; when
none fits, the error lists every backend's reasons. ``python -m dilated_attention_pytorch info``,
``explain_backend`` and ``explain_auto`` print these tables (:func:`render_table`).
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Any, Collection, Optional, Sequence, TypeVar

import torch

__all__ = ["Backend", "Declared", "Support", "describe_reasons", "first_supported", "has_package",
           "not_supported_reasons", "render_table"]

_PACKAGES: dict[str, bool] = {}


def has_package(name: str) -> bool:
    """Whether ``name`` is importable (looked up once; nothing is imported)."""
    found = _PACKAGES.get(name)
    if found is None:
        found = _PACKAGES[name] = importlib.util.find_spec(name) is not None
    return found


@dataclass(frozen=True)
class Support:
    """What a backend supports; ``None`` means any."""

    devices: Optional[tuple[str, ...]] = None
    dtypes: Optional[tuple[torch.dtype, ...]] = None
    max_head_dim: Optional[int] = None
    head_dim_multiple: int = 1
    block_multiple: int = 1  # block-sparse calls: block_size a multiple of this
    key_mask: bool = True
    dropout: bool = True
    lse_grad: bool = True  # its backward takes a gradient of the LSE (an explicit delta)
    compile: bool = True  # runs inside torch.compile
    packages: tuple[str, ...] = ()
    triton_interpreter: bool = False  # also on the CPU under TRITON_INTERPRET=1

    def __and__(self, other: "Support") -> "Support":
        """What both support (a backend made of two parts)."""
        def meet(a, b):
            return b if a is None else a if b is None else tuple(x for x in a if x in b)

        limit = [x for x in (self.max_head_dim, other.max_head_dim) if x is not None]
        return Support(
            meet(self.devices, other.devices), meet(self.dtypes, other.dtypes), min(limit) if limit else None,
            math.lcm(self.head_dim_multiple, other.head_dim_multiple),
            math.lcm(self.block_multiple, other.block_multiple),
            self.key_mask and other.key_mask, self.dropout and other.dropout, self.lse_grad and other.lse_grad,
            self.compile and other.compile, tuple(dict.fromkeys(self.packages + other.packages)),
            self.triton_interpreter and other.triton_interpreter,
        )


def _either(names: Sequence[str]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def not_supported_reasons(support: Support, inputs: Any) -> list[str]:
    """Why a backend that supports ``support`` cannot run ``inputs`` (a ``BlockInputs``); empty: it can."""
    s, reasons = support, []
    interpreted = s.triton_interpreter and inputs.device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    if s.devices is not None and inputs.device_type not in s.devices and not interpreted:
        also = " (or the CPU under TRITON_INTERPRET=1)" if s.triton_interpreter else ""
        reasons.append(f"runs on {_either(s.devices)} only{also}, inputs are on {inputs.device_type}")
    if s.dtypes is not None and inputs.dtype not in s.dtypes:
        reasons.append(f"needs {_either([_dtype_name(t) for t in s.dtypes])}, inputs are {inputs.dtype}")
    if s.max_head_dim is not None and (inputs.head_dim > s.max_head_dim or inputs.head_dim % s.head_dim_multiple):
        multiple = f"a multiple of {s.head_dim_multiple} and " if s.head_dim_multiple > 1 else ""
        reasons.append(f"needs head_dim {multiple}<= {s.max_head_dim}, got {inputs.head_dim}")
    block_size = getattr(inputs, "block_size", None)
    if block_size is not None and block_size % s.block_multiple:
        reasons.append(f"needs block_size a multiple of {s.block_multiple} (its tile), got {block_size}")
    if inputs.has_key_mask and not s.key_mask:
        reasons.append("does not support a key padding mask")
    if inputs.dropout and not s.dropout:
        reasons.append("does not support dropout")
    if inputs.needs_delta and not s.lse_grad:
        reasons.append("backward cannot take a gradient of the LSE")
    if torch.compiler.is_compiling():  # packages are not looked up inside a compiled graph
        if not s.compile:
            reasons.append("does not run under torch.compile")
    else:
        reasons += [f"needs the {p} package (pip install {p})" for p in s.packages if not has_package(p)]
    return reasons


class Declared:
    """A backend that declares its :class:`Support` (``support``) under a ``name``."""

    name: str
    support: Support

    def not_supported_reasons(self, inputs: Any) -> list[str]:
        return not_supported_reasons(self.support, inputs)


@dataclass(frozen=True)
class Backend(Declared):
    """A backend that is not a block kernel: its name, what it supports, what runs (one line), and the
    block kernel it always uses, if any."""

    name: str
    support: Support
    runs: str
    kernel: Any = None


T = TypeVar("T", bound=Declared)


def describe_reasons(reasons: dict[str, list[str]]) -> str:
    """``{name: reasons}`` as one line (a single backend's reasons without its name)."""
    if len(reasons) == 1:
        return "; ".join(next(iter(reasons.values())))
    return "; ".join(f"{name}: {', '.join(r)}" for name, r in reasons.items())


def first_supported(candidates: Sequence[T], inputs: Any, what: str, error: type[Exception] = ValueError,
                    hint: str = "") -> tuple[T, dict[str, list[str]]]:
    """The first of ``candidates`` (in order of preference) with no reasons against ``inputs``, and
    the reasons of every candidate looked at; when none fits, ``error("{what}: {reasons}{hint}")``
    listing each candidate's reasons."""
    reasons: dict[str, list[str]] = {}
    for candidate in candidates:
        reasons[candidate.name] = candidate.not_supported_reasons(inputs)
        if not reasons[candidate.name]:
            return candidate, reasons
    raise error(f"{what}: {describe_reasons(reasons)}{hint}")


# -- the table ---------------------------------------------------------------------------------------
_COLUMNS = ("backend", "devices", "dtypes", "head_dim", "key mask", "dropout", "LSE grad", "compile", "needs")


def _cells(name: str, s: Support) -> list[str]:
    devices = "any" if s.devices is None else ", ".join(s.devices)
    devices += " (cpu: interpreter)" if s.triton_interpreter else ""
    head_dim = "any" if s.max_head_dim is None else (
        f"<= {s.max_head_dim}" + (f", multiple of {s.head_dim_multiple}" if s.head_dim_multiple > 1 else ""))
    if s.block_multiple > 1:
        head_dim += f"; block_size multiple of {s.block_multiple}"
    flags = ["yes" if ok else "no" for ok in (s.key_mask, s.dropout, s.lse_grad, s.compile)]
    return [name, devices, "any float" if s.dtypes is None else ", ".join(map(_dtype_name, s.dtypes)), head_dim,
            *flags, ", ".join(s.packages) or "-"]


def render_table(rows: Sequence[tuple[str, Support]], reasons: Optional[dict[str, list[str]]] = None,
                 chosen: Collection[str] = ()) -> str:
    """A GitHub-style table of ``(name, support)`` rows; with ``reasons``, a column that says for each
    row whether it can run the inputs and why not."""
    head = list(_COLUMNS) + (["these inputs"] if reasons is not None else [])
    body = []
    for name, s in rows:
        cells = _cells(name, s)
        if reasons is not None:
            why = reasons.get(name)
            cells.append("chosen" if name in chosen else "-" if why is None else "; ".join(why) or "can run")
        body.append(cells)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    lines = [head, ["-" * w for w in widths]] + body
    return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |" for cells in lines)
