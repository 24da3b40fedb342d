"""The GEMV path of the Triton ``w4a16_linear`` provider (ops/w4a16_gemv.py) against the IR spec
(treadle_ir.ops.int4) on fresh random inputs, and the provider's choice of it.

CPU: Triton's interpreter runs the kernel at small, ragged sizes (n and k not multiples of the tiles, rows not a
multiple of the row block), in every layout the loader produces (zero points, symmetric, per channel, act order, a
group size no step divides), with and without bias, K split or not, through `launch_gemv` with the interpreter's tiles
and with tiles that reach each path (one row per program, a step of one word, steps straddling groups). Dispatch: the
GEMV runs up to ``gemv_max_rows()`` rows and not above, never with ``TREADLE_W4A16_GEMV_MAX_ROWS=0``. The production
tiles compile for sm_90 without a GPU. GPU (``-m gpu``): Llama-3.1-8B's projections at 1 to 16 rows. Tolerance: as
test_w4a16_linear.py's (the kernel computes the spec's products in fp32 and rounds once).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_ir_providers import CUDA, DEVICE, _triton, gpu, needs_cuda
from test_w4a16_linear import CASES, LLAMA_8B, _close, _inputs

import treadle_kernels  # noqa: F401  (registers the providers)
from treadle_ir import ops
from treadle_kernels.ops import w4a16_linear as provider

pytest.importorskip("triton")

from treadle_kernels.ops import w4a16_gemv as gemv

SMS = 132 if CUDA else 2
# the provider tests' shapes, and one group per column with k past the last full step (the group never changes)
GEMV_CASES = CASES | {"per-channel-ragged": (21, 200, 200, True, False)}


def _config(rows: int, n: int, k: int, group: int, split: int) -> gemv.GemvConfig:
    return gemv.choose_gemv_config(rows, n, k, group, SMS, CUDA)._replace(split_k=split)


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 16])
@pytest.mark.parametrize("case", list(GEMV_CASES))
def test_gemv_matches_spec(case: str, rows: int, split: int) -> None:
    n, k, group, zeros, act_order = GEMV_CASES[case]
    for dtype in (torch.float32, torch.bfloat16):
        args = _inputs(rows, n, k, group, dtype, seed=n + k + rows + split, zeros=zeros, act_order=act_order,
                       bias=rows % 2 == 1)  # fmt: skip
        _close(gemv.launch_gemv(*args, cfg=_config(rows, n, k, group, split)), ops.w4a16_linear.native(*args))


@pytest.mark.parametrize("case", ["grouped", "symmetric", "act-order"])
def test_gemv_fp16(case: str) -> None:
    n, k, group, zeros, act_order = CASES[case]
    args = _inputs(5, n, k, group, torch.float16, seed=11, zeros=zeros, act_order=act_order)
    _close(gemv.launch_gemv(*args, cfg=_config(5, n, k, group, 2)), ops.w4a16_linear.native(*args))


# (block_m, block_n, block_k, split_k, num_warps, num_stages): one row per program and one word per step; several
# row blocks; a step of 64 rows straddling groups of 32 / 40 (the per-row gather)
TILES = [
    gemv.GemvConfig(1, 16, 8, 1, 4, 1),
    gemv.GemvConfig(2, 32, 16, 4, 4, 1),
    gemv.GemvConfig(8, 64, 64, 2, 4, 1),
]


@pytest.mark.parametrize("cfg", TILES, ids=lambda c: f"m{c.block_m}n{c.block_n}k{c.block_k}s{c.split_k}")
@pytest.mark.parametrize("case", ["grouped-ragged", "symmetric", "per-channel-ragged", "act-order-symmetric"])
def test_every_tile_path_matches_spec(case: str, cfg: gemv.GemvConfig) -> None:
    n, k, group, zeros, act_order = GEMV_CASES[case]
    args = _inputs(7, n, k, group, torch.bfloat16, seed=k + cfg.block_k, zeros=zeros, act_order=act_order)
    _close(gemv.launch_gemv(*args, cfg=cfg), ops.w4a16_linear.native(*args))


def test_leading_dims_strided_rows_and_no_rows() -> None:
    """x as [2, 3, k], as a column slice of a wider buffer (rows strided), and with no rows."""
    x, *rest = _inputs(6, 24, 64, 32, torch.float32, seed=5)
    cfg = _config(6, 24, 64, 32, 2)
    x3 = x.view(2, 3, 64)
    _close(gemv.launch_gemv(x3, *rest, cfg=cfg), ops.w4a16_linear.native(x3, *rest))
    xs = torch.randn(3, 100, device=DEVICE)[:, :64]
    _close(gemv.launch_gemv(xs, *rest, cfg=cfg), ops.w4a16_linear.native(xs, *rest))
    assert gemv.launch_gemv(x[:0], *rest, cfg=cfg).shape == (0, 24)


@pytest.fixture
def gemv_rows_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """A fresh read of TREADLE_W4A16_GEMV_MAX_ROWS inside the test, the default's read after it."""
    provider.gemv_max_rows.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    provider.gemv_max_rows.cache_clear()


def _calls_gemv(rows: int, monkeypatch: pytest.MonkeyPatch) -> bool:
    args = _inputs(rows, 40, 64, 16, torch.float32, seed=rows)
    called: list[int] = []
    real = gemv.launch_gemv
    monkeypatch.setattr(gemv, "launch_gemv", lambda *a: called.append(1) or real(*a))
    with _triton(ops.w4a16_linear, *args):
        got = ops.w4a16_linear(*args)
    _close(got, ops.w4a16_linear.native(*args))
    return bool(called)


def test_dispatch_runs_the_gemv_up_to_the_threshold(gemv_rows_env: pytest.MonkeyPatch) -> None:
    gemv_rows_env.delenv("TREADLE_W4A16_GEMV_MAX_ROWS", raising=False)
    limit = provider.gemv_max_rows()
    assert limit == gemv.DEFAULT_MAX_ROWS
    assert _calls_gemv(1, gemv_rows_env) and _calls_gemv(limit, gemv_rows_env)
    # above: the tensor-core kernel
    assert not _calls_gemv(limit + 1, gemv_rows_env)


def test_dispatch_follows_the_env(gemv_rows_env: pytest.MonkeyPatch) -> None:
    gemv_rows_env.setenv("TREADLE_W4A16_GEMV_MAX_ROWS", "0")
    assert provider.gemv_max_rows() == 0 and not _calls_gemv(1, gemv_rows_env)
    provider.gemv_max_rows.cache_clear()
    gemv_rows_env.setenv("TREADLE_W4A16_GEMV_MAX_ROWS", "16")
    assert _calls_gemv(16, gemv_rows_env)
    provider.gemv_max_rows.cache_clear()
    gemv_rows_env.setenv("TREADLE_W4A16_GEMV_MAX_ROWS", "17")
    with pytest.raises(ValueError, match="TREADLE_W4A16_GEMV_MAX_ROWS='17'"):
        provider.gemv_max_rows()


def test_production_tiles() -> None:
    """A 4096-column projection's 64 column tiles are split to give 132 SMs 8 programs each at one row, 4 from two
    rows; gate_up's 448 tiles less; a step never straddles groups of 32 or 128 rows; rows past 8 run two row
    blocks."""
    one = gemv.choose_gemv_config(1, 4096, 4096, 128, sms=132)
    assert (one.block_m, one.block_n, one.block_k, one.split_k) == (1, 64, 128, 16)
    assert gemv.choose_gemv_config(2, 4096, 4096, 128, sms=132).split_k == 8
    assert gemv.choose_gemv_config(1, 28672, 4096, 128, sms=132).split_k == 2
    assert gemv.choose_gemv_config(8, 4096, 4096, 32, sms=132).block_k == 32
    assert gemv.choose_gemv_config(16, 4096, 4096, 128, sms=132).block_m == 8
    assert gemv.choose_gemv_config(0, 4096, 4096, 128, sms=132).split_k >= 1


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's compiler ships for Linux")
def test_gemv_compiles_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_sm90_w4a16_gemv.py")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled for sm_90" in proc.stdout


@gpu
@needs_cuda
@pytest.mark.parametrize("layout", ["asymmetric", "symmetric", "act-order"])
@pytest.mark.parametrize("rows", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("shape", LLAMA_8B)
def test_w4a16_gemv_gpu(shape: tuple[int, int], rows: int, layout: str) -> None:
    """bf16 at Llama-3.1-8B's projections (fp16 at one shape), group size 128, production tiles, against the spec."""
    n, k = shape
    for dtype in (torch.bfloat16, torch.float16) if n == 4096 and k == 4096 else (torch.bfloat16,):
        args = _inputs(rows, n, k, 128, dtype, seed=n + k + rows, zeros=layout == "asymmetric",
                       act_order=layout == "act-order", bias=n == 6144)  # fmt: skip
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        cfg = gemv.choose_gemv_config(rows, n, k, 128, sms)
        _close(gemv.launch_gemv(*args, cfg=cfg), ops.w4a16_linear.native(*args))
