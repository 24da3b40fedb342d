"""Start-up compile-ahead (runner/precompile.py): for a batch shape, the variants it compiles are the ones a real
step of that shape launches. On CPU under Triton's interpreter, with an H100's launch heuristics injected (so
split-KV, tile and fused-decode choices are a GPU's), each step of a schedule (prefill, chunk on cached blocks,
mixed decodes and prefills, a decode batch) records the Triton variants it launches (kernel, tensor dtypes,
constexprs and options); the compile-ahead walk of the same shape must submit exactly those, and launch none."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from test_runner_fakes import run_interpreted, save_llama

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from test_runner_fakes import FakeScheduler, make_runner
    from treadle_kernels.attention import triton_decode_kernel, triton_kernel
    from treadle_kernels.attention.triton_backend import TritonAttentionImpl
    from treadle_kernels.attention.triton_launch import H100_PROFILE
    from treadle_kernels.ops import cache_kernels, rotary_kernels
    from treadle_kernels.ops.launch import compile_only, compiles_finished
    from treadle_model_runner.runner import precompile

    launched, compiled = [], []

    def variant(name, args, kwargs):
        dtypes = tuple(str(a if isinstance(a, torch.dtype) else a.dtype) for a in args
                       if isinstance(a, (torch.Tensor, torch.dtype)))
        return name, dtypes, tuple(sorted((k, repr(v)) for k, v in kwargs.items()))

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launched.append(variant(self.name, args, kwargs))
                return self.kernel[grid](*args, **kwargs)
            return run
        def warmup(self, *args, grid, **kwargs):
            compiled.append(variant(self.name, args, kwargs))

    class RecordingPool:  # compiles "now", recording what was asked
        def submit(self, fn, *args, **kwargs):
            fn(*args, **kwargs)
            from concurrent.futures import Future
            f = Future()
            f.set_result(None)
            return f

    for module, name in ((triton_kernel, "paged_attention_kernel"), (triton_kernel, "reduce_splits_kernel"),
                         (triton_decode_kernel, "decode_attention_kernel"), (rotary_kernels, "rotary_qk_kernel"),
                         (cache_kernels, "reshape_and_cache_kernel")):
        setattr(module, name, Recorder(name, getattr(module, name)))
    TritonAttentionImpl.device_profile = H100_PROFILE  # a GPU's splits and tiles, run by the interpreter

    runner = make_runner(sys.argv[1], attention_backend="triton", block_size=4, max_num_seqs=8)
    layer = runner._require_model().attention_layers()[0]
    if sys.argv[2:] == ["sinks"]:  # every layer with attention sinks (gpt-oss), as a model hands them over
        for a in runner._require_model().attention_layers():
            a.__dict__["sinks"] = torch.randn(a.num_heads, generator=torch.Generator().manual_seed(a.layer_idx))
            a.bind_backend(runner.attn_backend)
    sched = FakeScheduler(runner, seed=1)
    for i in range(4):
        sched.add(f"r{i}", list(range(1 + i, 13 + i)), max_tokens=4)
    plans = [
        {"r0": 12},                       # a prefill
        {"r1": 8},                        # a short prefill (split-KV: one query tile)
        {"r1": 4, "r2": 12},              # a chunk on cached blocks and a prefill
        {"r0": 1, "r1": 1, "r3": 12},     # decodes and a prefill (the double launch)
        {"r0": 1, "r1": 1, "r2": 1, "r3": 1},  # a decode batch (the fused decode kernel)
    ]
    checked = 0
    for plan in plans:
        before = {r: sched.requests[r].num_computed for r in plan}
        launched.clear()
        sched.step(plan)
        real = set(launched)
        shape = (tuple(plan.values()), tuple(before[r] for r in plan))
        compiled.clear()
        launched.clear()
        with compile_only(RecordingPool()):
            precompile._attend(runner, layer, shape, *precompile.attention_inputs(runner, layer))
        assert not launched, f"{shape}: the walk launched {launched}"
        assert set(compiled) == real, f"{shape}: compiled {sorted(set(compiled))} but a step launched {sorted(real)}"
        checked += len(real)
    names = {v[0] for v in compiled}
    assert "decode_attention_kernel" in names, names
    has_sinks = any(("HAS_SINKS", "True") in v[2] for v in compiled)
    assert has_sinks == (sys.argv[2:] == ["sinks"]), "the sink variants should be walked exactly for sink layers"
    compiles_finished()
    print("variants checked", checked)
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU start-up covers the real compile")
@pytest.mark.parametrize("sinks", [False, True], ids=["plain", "sinks"])
def test_compile_ahead_walk_compiles_what_a_step_launches(tmp_path: Path, sinks: bool) -> None:
    """``sinks``: every layer carries attention sinks (gpt-oss), so steps launch the HAS_SINKS variants."""
    save_llama(tmp_path, seed=2, vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    out = run_interpreted(SCRIPT, str(tmp_path), *(["sinks"] if sinks else []))
    assert "variants checked" in out


def test_layer_kinds_tell_sinks_apart() -> None:
    """Two layers alike but for their sinks are two kinds (each compiles its own variants); a sliding layer is a
    third, and a repeat of a kind adds none."""
    from treadle_model_runner.layers.attention import Attention
    from treadle_model_runner.runner.precompile import _layer_kinds

    plain = Attention(0, 4, 16, 0.25, 2)
    sunk = Attention(1, 4, 16, 0.25, 2, sinks=torch.zeros(4))
    sliding = Attention(2, 4, 16, 0.25, 2, sliding_window=128, sinks=torch.zeros(4))
    again = Attention(3, 4, 16, 0.25, 2, sinks=torch.zeros(4))
    assert _layer_kinds([plain, sunk, sliding, again]) == [plain, sunk, sliding]


@pytest.mark.parametrize(("device", "index"), [("cuda", 3), ("cuda:1", 1)])
def test_compile_threads_set_their_device_by_index(
    monkeypatch: pytest.MonkeyPatch, device: str, index: int
) -> None:
    """A runner's device may be a bare "cuda": the threads must still get an index (the first GPU run failed on
    exactly this, so nothing compiled ahead)."""
    from treadle_model_runner.runner.precompile import compile_pool

    def set_device(d: object) -> None:
        assert isinstance(d, int), f"set_device({d!r}): torch refuses a device without an index"
        seen.append(d)

    seen: list[int] = []
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    pool = compile_pool(torch.device(device), 2)
    try:
        for f in [pool.submit(lambda: None) for _ in range(4)]:
            f.result()
    finally:
        pool.shutdown()
    assert seen and set(seen) == {index}
