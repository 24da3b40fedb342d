"""The L2 prefetch of o_proj during a small decode step's attention (``TREADLE_L2_PREFETCH``,
treadle_kernels/ops/prefetch.py) inside the runner, on a GPU: one request decoding alone (one-token steps) on a
tiny bf16 Llama, with the prefetch off, on the same stream and on a side stream, each eager and replayed from CUDA
graphs. A prefetch changes no value, so every run gives the same tokens and bit-identical hidden states; the
prefetch must have been launched (eagerly, and while the decode graphs were captured)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from test_runner_fakes import FakeScheduler, make_runner, record_hidden, save_llama

from treadle_kernels.ops import prefetch

VOCAB = 96
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama_prefetch"), 5, vocab_size=VOCAB, hidden_size=256,
                      intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256)  # fmt: skip


@pytest.fixture(autouse=True)
def _fresh_env() -> Iterator[None]:
    yield
    prefetch._max_tokens.cache_clear()
    prefetch._side_stream_on.cache_clear()


class Run(NamedTuple):
    tokens: dict[str, list[int]]
    hidden: list[torch.Tensor]
    launches_building: int  # prefetch launches while the runner was built (warm-up, graph capture)
    launches_running: int  # ... while it generated


def _run(path: Path, enforce_eager: bool, launched: list[int]) -> Run:
    """Generate 8 tokens for one 21-token prompt (a prefill, then 7 one-token decode steps)."""
    prefetch._max_tokens.cache_clear()
    prefetch._side_stream_on.cache_clear()
    before = len(launched)
    runner = make_runner(path, 4, 64, block_size=16, num_blocks=32, device="cuda", dtype="bfloat16",
                         attention_backend="triton", enforce_eager=enforce_eager)  # fmt: skip
    sched = FakeScheduler(runner, seed=3)
    hidden = record_hidden(runner)
    built = len(launched)
    sched.add("r0", torch.randint(1, VOCAB, (21,), generator=torch.Generator().manual_seed(6)).tolist(),
              max_tokens=8)  # fmt: skip
    tokens = sched.run(budget=64)
    return Run(tokens, hidden, built - before, len(launched) - built)


@pytest.mark.parametrize("side_stream", [False, True])
def test_prefetch_changes_no_token_or_hidden_state(
    llama: Path, monkeypatch: pytest.MonkeyPatch, side_stream: bool
) -> None:
    launched: list[int] = []
    real = prefetch.launch
    monkeypatch.setattr(prefetch, "launch", lambda t: launched.append(real(t)) or launched[-1])
    monkeypatch.setenv("TREADLE_L2_PREFETCH", "0")
    off = {eager: _run(llama, eager, launched) for eager in (True, False)}
    assert not launched
    monkeypatch.setenv("TREADLE_L2_PREFETCH", "1")
    monkeypatch.setenv("TREADLE_L2_PREFETCH_STREAM", "1" if side_stream else "0")
    on = {eager: _run(llama, eager, launched) for eager in (True, False)}
    assert on[True].launches_running == 2 * 7, "expected one launch per layer in each one-token decode step"
    assert on[False].launches_building > 0, "no prefetch was captured into the decode graphs"
    assert on[False].launches_running == 0, "graph decode steps launched eagerly"
    for eager in (True, False):
        assert on[eager].tokens == off[eager].tokens
        assert len(on[eager].hidden) == len(off[eager].hidden) == 8
        for a, b in zip(off[eager].hidden, on[eager].hidden, strict=True):
            assert torch.equal(a, b), f"hidden states changed (eager={eager})"
    assert off[True].tokens == off[False].tokens  # graphs give eager's tokens
