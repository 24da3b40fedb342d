"""Kernels test setup: without CUDA, Triton runs under its CPU interpreter (must be set before triton imports)."""

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


@pytest.fixture(autouse=True)
def _xqa_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The triton backend's tests test the Triton kernels: XQA, on by default for e4m3 caches on Hopper GPUs
    (attention/xqa.py), stays off unless a test turns it on (test_attention_xqa.py)."""
    monkeypatch.setenv("TREADLE_ATTN_XQA", "0")
