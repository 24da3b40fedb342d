"""XQA decode (``TREADLE_ATTN_XQA``, treadle_kernels/attention/xqa.py) inside the runner, on a GPU: a tiny bf16
Llama with 128-wide heads (XQA's sizes) and an fp8 cache; decode steps replayed from CUDA graphs against the same
runner eager, and both against the torch backend on the same fp8 cache. Every prompt is prefilled in the first
step, then four requests decode together. Graphs and eager run one kernel: the same tokens, the same hidden states.
Against torch, only the first decode step is compared: its inputs are the prefill's tokens in both runs, while a
later step's may differ wherever XQA's e4m3 rounding of the query and softmax weights flipped a near-tie. The fused
small-batch decode kernel is off (``TREADLE_FUSED_DECODE_ATTENTION=0``): with one KV head it would serve every
decode batch of this test, and XQA none."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_runner_fakes import FakeScheduler, make_runner, record_hidden, save_llama

from treadle_kernels.attention import xqa

VOCAB = 96
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama_xqa"), 3, vocab_size=VOCAB, hidden_size=256,
                      intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=256)  # fmt: skip


def _run(path: Path, **model: object) -> tuple[dict[str, list[int]], list[torch.Tensor]]:
    runner = make_runner(path, 8, 64, block_size=16, num_blocks=64, kv_cache_dtype="fp8", device="cuda",
                         dtype="bfloat16", **model)  # fmt: skip
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (19, 7, 30, 3)]
    sched = FakeScheduler(runner, seed=2)
    hidden = record_hidden(runner)
    for i, p in enumerate(prompts):
        sched.add(f"r{i}", p, max_tokens=4)
    return sched.run(budget=64), hidden


def _error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(
        float((x.float() - y.float()).abs().mean() / x.float().abs().mean())
        for x, y in zip(a, b, strict=True)
    )


def test_xqa_decode_in_graphs_matches_eager_and_torch(llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("flashinfer")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("XQA's fp8 kernel is Hopper's")
    torch_tokens, torch_hidden = _run(llama, attention_backend="torch", enforce_eager=True)
    monkeypatch.setenv("TREADLE_ATTN_XQA", "1")
    monkeypatch.setenv("TREADLE_FUSED_DECODE_ATTENTION", "0")
    served: list[int] = []
    real = xqa.decode
    monkeypatch.setattr(xqa, "decode", lambda *a: served.append(1) or real(*a))
    eager_tokens, eager_hidden = _run(llama, attention_backend="triton", enforce_eager=True)
    assert served, "XQA served no decode step"
    eager_calls = len(served)
    graph_tokens, graph_hidden = _run(llama, attention_backend="triton")
    assert len(served) > eager_calls, "the decode graphs were not captured on XQA"
    first_decode = _error(torch_hidden[:2], eager_hidden[:2])  # the prefill step, then the first decode step
    print(f"hidden error: graphs vs eager {_error(eager_hidden, graph_hidden):.4f}, eager vs torch over the "
          f"prefill and first decode step {first_decode:.4f}; tokens {eager_tokens} / torch {torch_tokens}")  # fmt: skip
    assert len(eager_hidden) == len(graph_hidden) == 4  # one prefill step, three decode steps
    assert graph_tokens == eager_tokens
    assert _error(eager_hidden, graph_hidden) < 0.02  # one kernel; the graph's padding may change its splits
    assert {r: t[:1] for r, t in eager_tokens.items()} == {r: t[:1] for r, t in torch_tokens.items()}
    assert first_decode < 0.08  # XQA rounds the query and softmax weights to e4m3 (~3.5 % per attention)
