"""Capabilities as data: one reasons function over each backend's declared support, one priority runner,
and the tables that ``info``, ``explain_backend`` and ``explain_auto`` print."""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch import explain_auto, explain_backend, info
from dilated_attention_pytorch.backends import BACKENDS, DILATED_BACKENDS, FUSED, backend_table
from dilated_attention_pytorch.block_sparse.functional import BACKENDS as SPARSE_NAMES, SPARSE_BACKENDS
from dilated_attention_pytorch.capabilities import Backend, Declared, Support, first_supported, not_supported_reasons
from dilated_attention_pytorch.kernels import KERNELS, BlockInputs, NoKernelError, choose_kernel


def _inputs(device="cuda", dtype=torch.bfloat16, head_dim=64, mask=False, dropout=False, delta=False, block=None):
    return BlockInputs(device, dtype, head_dim, mask, dropout, delta, block)


def test_every_field_of_the_data_gives_its_reason():
    s = Support(devices=("cuda",), dtypes=(torch.float16,), max_head_dim=128, head_dim_multiple=8, block_multiple=128,
                key_mask=False, dropout=False, lse_grad=False)
    assert not_supported_reasons(s, _inputs(dtype=torch.float16, block=256)) == []
    reasons = not_supported_reasons(s, _inputs("cpu", torch.float32, 60, True, True, True, 64))
    assert reasons == [
        "runs on cuda only, inputs are on cpu", "needs float16, inputs are torch.float32",
        "needs head_dim a multiple of 8 and <= 128, got 60", "needs block_size a multiple of 128 (its tile), got 64",
        "does not support a key padding mask", "does not support dropout", "backward cannot take a gradient of the LSE",
    ]
    missing = Support(packages=("surely_not_an_installed_package",))
    assert not_supported_reasons(missing, _inputs()) == [
        "needs the surely_not_an_installed_package package (pip install surely_not_an_installed_package)"]


def test_a_backend_of_two_parts_supports_what_both_do():
    both = Support(devices=("cpu", "cuda"), max_head_dim=256, packages=("triton",), compile=False) & Support(
        devices=("cuda",), dtypes=(torch.float16,), max_head_dim=128, head_dim_multiple=8, dropout=False)
    assert both == Support(devices=("cuda",), dtypes=(torch.float16,), max_head_dim=128, head_dim_multiple=8,
                           dropout=False, compile=False, packages=("triton",))
    assert FUSED.support == Support(lse_grad=False, packages=("triton",)) & FUSED.kernel.support


def test_the_runner_takes_the_first_that_fits_and_else_lists_every_reason():
    a = Backend("a", Support(devices=("cuda",)), "a")
    b = Backend("b", Support(dropout=False), "b")
    chosen, reasons = first_supported((a, b), _inputs("cpu"), "nothing fits")
    assert chosen is b and reasons == {"a": ["runs on cuda only, inputs are on cpu"], "b": []}
    with pytest.raises(ValueError, match=r"nothing fits: a: runs on cuda only, inputs are on cpu; "
                                         r"b: does not support dropout; use c$"):
        first_supported((a, b), _inputs("cpu", dropout=True), "nothing fits", hint="; use c")
    with pytest.raises(NoKernelError, match="no block kernel supports these inputs: cudnn: runs on cuda only"):
        choose_kernel(_inputs("cpu"), KERNELS[:2])


def test_backend_names_come_from_the_tables():
    assert BACKENDS == ("auto", "fused", "portable", "reference") == ("auto", *(b.name for b in DILATED_BACKENDS))
    assert SPARSE_NAMES == ("auto", "portable", "flex", "triton") == ("auto", *(b.name for b in SPARSE_BACKENDS))


def test_explain_backend_explain_auto_and_info_print_the_table(capsys):
    q = torch.randn(1, 8, 2, 8)
    choice = explain_backend(q, key_padding_mask=torch.zeros(1, 8, dtype=torch.bool))
    assert str(choice).startswith("portable (block kernel: cpu_flash) — fused path not used: cudnn: ")
    row = {line.split("|")[1].strip(): line for line in choice.table().splitlines()[2:]}
    assert set(row) == {"fused", "portable", "reference"} | {f"portable: {k.name}" for k in KERNELS}
    assert "does not support a key padding mask" in row["fused"] and "chosen" in row["portable: cpu_flash"]
    assert "| triton |" in row["fused"]  # what it needs
    assert "can run" in row["portable: math"] and "chosen" in row["portable"]
    auto = explain_auto(device="cpu")
    assert str(auto).startswith("auto -> standard") and "runs on cuda only" in auto.table()
    assert "| LSE grad |" in auto.table()
    info.main([])
    out = capsys.readouterr().out
    assert backend_table() in out and "block-sparse attention" in out and "| flex " in out


def test_reasons_stay_data_driven_for_a_custom_kernel():
    """A new backend is a name and a Support (plus what it runs): the dispatcher needs nothing else."""
    class Wide(Declared):
        name, support = "wide", Support(max_head_dim=512)

    assert choose_kernel(_inputs("cpu", head_dim=300), (Wide(),)).name == "wide"
    with pytest.raises(NoKernelError, match="supports these inputs: needs head_dim <= 512, got 600"):
        choose_kernel(_inputs("cpu", head_dim=600), (Wide(),))
