"""Oracle: which experts + prepare/finalize for a platform, dtype and batch, and the reasons it gives."""

from __future__ import annotations

import pytest
import torch

import treadle_moe
from treadle_moe import MoEProblem, NoEPBatchedPrepareFinalize, NoEPStandardPrepareFinalize, select_moe_kernel
from treadle_moe.experts.torch_ref import TorchExperts
from treadle_moe.experts.triton_fused import BatchedTritonExperts, TritonExperts


def problem(device: str = "cpu", dtype: torch.dtype = torch.bfloat16, **kwargs: object) -> MoEProblem:
    return MoEProblem(128, 8, 2048, 768, dtype, torch.device(device), **kwargs)  # type: ignore[arg-type]


def test_cpu_picks_torch_reference_and_explains(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TREADLE_MOE_BACKEND", raising=False)
    choice = select_moe_kernel(problem())
    assert choice.experts_cls is TorchExperts
    assert isinstance(choice.prepare_finalize, NoEPStandardPrepareFinalize)
    text = choice.describe()
    assert "torch_reference" in text and "cuda" in text and "no expert parallelism" in text
    assert "E=128" in treadle_moe.report()


def test_cuda_picks_triton_with_tuned_config(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.delenv("TREADLE_MOE_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    choice = select_moe_kernel(problem("cuda", max_num_tokens=4096))
    assert choice.experts_cls is TritonExperts
    text = choice.describe()
    assert "tuned NVIDIA_H200.json" in text and "at 256 tokens" in text
    fp64 = select_moe_kernel(problem("cuda", torch.float64))
    assert fp64.experts_cls is TorchExperts and "float64" in fp64.describe()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert "fallback heuristic" in select_moe_kernel(problem("cuda")).describe()


def test_forced_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TREADLE_MOE_BACKEND", "torch_batched")
    choice = select_moe_kernel(problem())
    assert (
        isinstance(choice.prepare_finalize, NoEPBatchedPrepareFinalize)
        and "TREADLE_MOE_BACKEND" in choice.describe()
    )
    monkeypatch.setenv("TREADLE_MOE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="TREADLE_MOE_BACKEND"):
        select_moe_kernel(problem())
    monkeypatch.delenv("TREADLE_MOE_BACKEND")
    with pytest.raises(ValueError, match="valid"):
        select_moe_kernel(problem(), backend="cutlass")
    # a CUDA problem: on a GPU machine (no interpreter) triton refuses a CPU problem for its device first
    with pytest.raises(ValueError, match="float64"):
        select_moe_kernel(problem("cuda", dtype=torch.float64), backend="triton")
    # under the interpreter (set by conftest on CPU machines) triton may be forced on CPU for testing
    if not torch.cuda.is_available() and TritonExperts.support_reason("cpu", torch.bfloat16, "silu") is None:
        assert select_moe_kernel(problem(), backend="triton_batched").experts_cls is BatchedTritonExperts
