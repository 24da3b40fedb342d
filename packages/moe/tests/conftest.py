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


@pytest.fixture(params=["plain", "swap_ab"])
def mxfp4_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs the test once per form of the MXFP4 grouped GEMM at every batch size (experts/triton_mxfp4.py): C = A W^T,
    then C^T = W A^T, over the tiles the config policy picks."""
    import dataclasses

    from treadle_moe.experts import triton_fused

    policy = triton_fused.mxfp4_config
    swap = request.param == "swap_ab"

    def forced(*args: object, **kwargs: object) -> object:
        return dataclasses.replace(policy(*args, **kwargs), swap_ab=swap)  # type: ignore[arg-type, type-var]

    monkeypatch.setattr(triton_fused, "mxfp4_config", forced)
    return str(request.param)
