"""The FlashInfer backend against the torch reference (GPU only; skipped without CUDA or flashinfer)."""

from __future__ import annotations

import pytest
import torch
from attention_cases import make_case

from treadle_kernels.attention import get_attn_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _batch(kind: str) -> list[tuple[int, int]]:
    gen = torch.Generator().manual_seed(7)
    decodes = [(int(c), 1) for c in torch.randint(1, 4000, (32,), generator=gen)]
    if kind == "decode":
        return decodes
    if kind == "prefill":
        return [(0, 1200), (0, 333), (0, 17)]
    return [(0, 700), (1500, 256), (64, 9), *decodes]


def _run(name, case, window, cap, layers=1):
    backend = get_attn_backend(name, "cuda")
    builder = backend.get_builder_cls()(16, "cuda")
    md = builder.build(case.metadata)
    outs = []
    for _ in range(layers):  # several layers share one step's metadata (and plan)
        impl = backend.get_impl_cls()(32, 128, 128**-0.5, 8, window, cap)
        out = torch.zeros_like(case.query)
        impl.forward(case.query, case.key, case.value, case.kv_cache.clone(), md, out)
        outs.append(out[: case.metadata.num_actual_tokens])
    return outs, md


@pytest.mark.parametrize("kind", ["decode", "prefill", "mixed"])
@pytest.mark.parametrize(("window", "cap"), [(None, None), (512, None), (None, 30.0)])
def test_flashinfer_matches_torch(kind, window, cap):
    pytest.importorskip("flashinfer")
    case = make_case(_batch(kind), 32, 8, 128, 16, dtype=torch.bfloat16, device="cuda", seed=31)
    (ref,), _ = _run("torch", case, window, cap)
    outs, md = _run("flashinfer", case, window, cap, layers=2)
    assert len(md.planned) == 1, "layers with one signature must share one plan per step"
    for out in outs:
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_flashinfer_missing_gives_install_hint(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "flashinfer":
            raise ImportError("no flashinfer")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    backend = get_attn_backend("flashinfer", "cuda")
    with pytest.raises(ImportError, match=r"flashinfer-python"):
        backend.get_builder_cls()(16, "cuda")
