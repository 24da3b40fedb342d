"""The L2 prefetch hint (treadle_kernels/ops/prefetch.py): when it launches, what it requests, and on a GPU that
it changes no value, in a CUDA graph too, on the same stream and on a side stream. The kernel's PTX (one
``prefetch.global.L2`` per line) is checked by compile_sm90.py; whether it saves time is measured end to end
(benchmarks/README.md), not here."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from treadle_kernels.ops import prefetch
from treadle_kernels.ops.prefetch import LINE_BYTES, LINES_PER_PROGRAM, applies, l2_prefetched, plan

_CACHED = (prefetch._max_tokens, prefetch._side_stream_on)


@pytest.fixture(autouse=True)
def _fresh_env() -> Iterator[None]:
    for f in _CACHED:
        f.cache_clear()
    yield
    for f in _CACHED:
        f.cache_clear()


def test_off_unless_asked_and_never_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    t = torch.zeros(64, 64)
    monkeypatch.delenv("TREADLE_L2_PREFETCH", raising=False)
    assert not applies(t, 1)
    monkeypatch.setenv("TREADLE_L2_PREFETCH", "4")
    prefetch._max_tokens.cache_clear()
    assert not applies(t, 1)  # a CPU tensor
    assert not applies(None, 1)
    monkeypatch.setattr(prefetch, "launch", lambda t: pytest.fail("launched on CPU"))
    with l2_prefetched(t, 1):
        pass


def test_bad_setting_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TREADLE_L2_PREFETCH", "yes")
    with pytest.raises(ValueError, match="TREADLE_L2_PREFETCH='yes'"):
        applies(torch.zeros(1), 1)


@pytest.mark.parametrize("nbytes", [1, 127, 128, 129, 33_554_432, 33_554_432 + 5])
def test_plan_covers_the_tensor_up_to_l2(nbytes: int) -> None:
    for l2 in (50 * 2**20, 2**20):
        lines, programs = plan(nbytes, l2)
        wanted = min(nbytes, l2)
        assert (lines - 1) * LINE_BYTES < wanted <= lines * LINE_BYTES  # every byte wanted, no line past it
        assert (programs - 1) * LINES_PER_PROGRAM < lines <= programs * LINES_PER_PROGRAM
    assert plan(0, 2**20) == (0, 0)


@pytest.mark.parametrize("side_stream", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_prefetch_changes_nothing_eager_and_in_a_graph(
    monkeypatch: pytest.MonkeyPatch, side_stream: bool, dtype: torch.dtype
) -> None:
    monkeypatch.setenv("TREADLE_L2_PREFETCH", "1")
    monkeypatch.setenv("TREADLE_L2_PREFETCH_STREAM", "1" if side_stream else "0")
    launched: list[int] = []
    real = prefetch.launch
    monkeypatch.setattr(prefetch, "launch", lambda t: launched.append(real(t)) or launched[-1])
    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(4096 + 3, 4096, device="cuda", generator=gen).to(dtype)  # ~L2-sized, odd length
    x = torch.randn(1, 4096, device="cuda", generator=gen)
    before = weight.clone()

    def step() -> torch.Tensor:
        with l2_prefetched(weight, x.shape[0]):
            y = x * 2  # stands for attention
        return y @ weight.float().T

    expected = x * 2 @ before.float().T
    torch.testing.assert_close(step(), expected, rtol=0, atol=0)
    assert len(launched) == 1 and launched[0] > 0
    torch.cuda.synchronize()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up on the capture stream
        with torch.cuda.graph(graph, stream=stream):
            out = step()
    torch.cuda.current_stream().wait_stream(stream)
    assert len(launched) == 3  # eager, warm-up, capture
    x.copy_(torch.randn(1, 4096, device="cuda", generator=gen))
    graph.replay()
    torch.testing.assert_close(out, x * 2 @ before.float().T, rtol=0, atol=0)
    assert torch.equal(weight.view(torch.uint8), before.view(torch.uint8))
    assert not applies(weight, 2)  # more tokens than TREADLE_L2_PREFETCH
