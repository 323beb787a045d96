"""python -m dilated_attention_pytorch info: what every backend supports (the capability tables the
dispatchers read); then, each with yes/no and why: the runtime (CUDA, Triton, torch.distributed), every
optional extra of the package, every backend of dilated attention (fused, portable, reference) and its
block kernels (cudnn, cuda_flash, cpu_flash, math), every backend of block-sparse attention (portable,
flex, triton) on typical inputs of each device, and every attention family of the factory."""

from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from . import _cli
from .capabilities import has_package, render_table

__all__ = ["BackendStatus", "build_parser", "collect", "main", "tables"]


@dataclass(frozen=True)
class BackendStatus:
    section: str
    name: str
    available: bool
    detail: str


def _probes() -> list[BackendStatus]:
    """Each backend of both families and each block kernel on typical inputs of each device: its reasons."""
    from .backends import DILATED_BACKENDS
    from .block_sparse.functional import SPARSE_BACKENDS
    from .kernels import KERNELS, BlockInputs

    probes = [("cpu", torch.float32, "cpu float32"), ("cpu", torch.bfloat16, "cpu bfloat16")]
    if torch.cuda.is_available():
        probes += [("cuda", torch.bfloat16, "cuda bfloat16"), ("cuda", torch.float32, "cuda float32")]
    else:
        probes += [("cuda", torch.bfloat16, "cuda bfloat16 (no GPU here)")]
    rows = []
    for device_type, dtype, label in probes:
        inputs = BlockInputs(device_type, dtype, 64, False, False, False, 128)
        families = (("dilated backends", DILATED_BACKENDS), ("block kernels", KERNELS),
                    ("block-sparse backends, block_size 128", SPARSE_BACKENDS))
        for family, backends in families:
            for backend in backends:
                reasons = backend.not_supported_reasons(inputs)
                usable = not reasons and (device_type != "cuda" or torch.cuda.is_available())
                detail = "; ".join(reasons) or ("supported" if usable else "supported, but no CUDA GPU here")
                rows.append(BackendStatus(f"{family}, {label}, head_dim 64", backend.name, usable, detail))
    return rows


def _runtime() -> list[BackendStatus]:
    import torch.distributed as dist

    rows = []
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        rows.append(BackendStatus("runtime", "cuda", True, f"{torch.cuda.device_count()} GPU(s): {names}; "
                                                           f"CUDA {torch.version.cuda}"))
    else:
        why = "torch built without CUDA" if torch.version.cuda is None else "no CUDA device visible"
        rows.append(BackendStatus("runtime", "cuda", False, why))
    triton, gpu = has_package("triton"), torch.cuda.is_available()
    if not triton:
        why = "not installed (pip install 'dilated-attention-pytorch[triton]'): no fused path, no Triton block-sparse"
    elif gpu:
        why = "installed: the fused path's gather kernel and the block-sparse kernels can run"
    else:
        why = "installed, but unused without a CUDA GPU (its kernels run on CPU only in Triton's slow interpreter, " \
              "TRITON_INTERPRET=1, as the tests do)"
    rows.append(BackendStatus("runtime", "triton", triton and gpu, why))
    if not dist.is_available():
        rows.append(BackendStatus("runtime", "torch.distributed", False, "torch built without distributed support"))
    else:
        state = "initialised, world size %d" % dist.get_world_size() if dist.is_initialized() else "no process group"
        rows.append(BackendStatus("runtime", "torch.distributed", True, state))
        rows.append(BackendStatus("runtime", "gloo", dist.is_gloo_available(), "CPU process groups"
                                  if dist.is_gloo_available() else "not built into torch"))
        nccl = dist.is_nccl_available()
        rows.append(BackendStatus("runtime", "nccl", nccl and torch.cuda.is_available(),
                                  "GPU process groups" if nccl and torch.cuda.is_available()
                                  else ("built, but no CUDA GPU here" if nccl else "not built into torch")))
    return rows


# extra -> (its packages, what it gives); tests check this against pyproject.toml
EXTRAS = {
    "triton": (("triton",), "the fused GPU path and the block-sparse Triton kernels (CUDA only)"),
    "bench": (("tqdm", "matplotlib"), "the bench command, train's progress bar and loss plot"),
    "hf": (("transformers",), "the Hugging Face attention registration"),
    "deepspeed": (("deepspeed",), "DeepSpeed ZeRO training (examples/DEEPSPEED.md); nothing in the package imports it"),
    "test": (("pytest", "hypothesis", "pytest_timeout"), "the test suite"),
}


def _extras() -> list[BackendStatus]:
    rows = []
    for extra, (packages, use) in EXTRAS.items():
        missing = [p for p in packages if not has_package(p)]
        why = f"{', '.join(packages)}: " + (f"installed; for {use}" if not missing else
                                           f"{', '.join(missing)} not installed (pip install "
                                           f"'dilated-attention-pytorch[{extra}]'); for {use}")
        rows.append(BackendStatus("optional extras", f"[{extra}]", not missing, why))
    return rows


def _families() -> list[BackendStatus]:
    from .factory import explain_auto, route_status

    section = "attention families (factory)"
    rows = [BackendStatus(section, name, ok, detail) for name, (ok, detail) in route_status().items()]
    rows.append(BackendStatus(section, "auto", True, str(explain_auto())))
    return rows


def collect() -> list[BackendStatus]:
    return _runtime() + _extras() + _probes() + _families()


def tables() -> str:
    """What every backend of both families supports (the data the dispatchers read)."""
    from .backends import backend_table
    from .block_sparse.functional import SPARSE_BACKENDS

    sparse = render_table([(b.name, b.support) for b in SPARSE_BACKENDS])
    return f"dilated attention: backends and block kernels\n{backend_table()}\n\nblock-sparse attention\n{sparse}"


def build_parser() -> argparse.ArgumentParser:
    return _cli.parser("info", __doc__)


def main(argv: Optional[list[str]] = None) -> list[BackendStatus]:
    return _info(build_parser().parse_args(argv))


def _info(args: argparse.Namespace) -> list[BackendStatus]:
    from . import __version__

    print(f"dilated-attention-pytorch {__version__}, torch {torch.__version__}, python {platform.python_version()} "
          f"on {sys.platform}")
    print(f"\n{tables()}")
    rows = collect()
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            print(f"\n{section}")
        print(f"  {'yes' if row.available else 'no ':<4}{row.name:<20}{row.detail}")
    return rows


if __name__ == "__main__":
    main()
