"""Shared fixtures. Without CUDA, Triton kernels run in its CPU interpreter: TRITON_INTERPRET must be set before
triton is first imported, so it is set here, before any test module imports treadle_moe's kernels."""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if sys.platform == "linux":
    # Triton ships for Linux with every declared dependency: if it fails to import here, its tests would only
    # skip, so fail loudly instead (a missing interpreter dependency once hid every Triton test).
    import triton
    import triton.language  # noqa: F401

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(params=["gemv", "gemm", "gemm_swap_ab"])
def mxfp4_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs the test once per MXFP4 kernel (experts/triton_mxfp4.py) at every batch size: the GEMV, the grouped
    GEMM, the grouped GEMM computing C^T = W A^T."""
    monkeypatch.setenv("TREADLE_MOE_MXFP4_GEMV_MAX_ROWS", "1000000" if request.param == "gemv" else "0")
    monkeypatch.setenv(
        "TREADLE_MOE_MXFP4_SWAP_AB_MAX_M", "1000000" if request.param == "gemm_swap_ab" else "0"
    )
    return str(request.param)
