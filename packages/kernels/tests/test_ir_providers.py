"""Every Triton IR provider against the op's native implementation on fresh random inputs.

CPU: Triton's interpreter at tiny sizes, forced with ``op.priority(["triton"])``. GPU (``-m gpu``): model
sizes. Outputs are poisoned first: the allocator is handed NaN-filled memory and caches / in-place buffers
are NaN-filled where the op does not write, so a kernel that skips elements fails.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

import treadle_kernels  # noqa: F401  (registers the triton providers)
from treadle_ir import IrOp, ops

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _tol(dtype: torch.dtype) -> dict[str, float]:
    """Acceptance tolerances; bf16 under the interpreter gets 2 ulps because it truncates fp32 -> bf16."""
    bf16 = 1e-2 if CUDA else 2.5e-2
    return {
        torch.float32: {"atol": 1e-5, "rtol": 1e-5},
        torch.float16: {"atol": 2e-3, "rtol": 2e-3},
        torch.bfloat16: {"atol": bf16, "rtol": bf16},
    }[dtype]


# bf16 acceptance bound on ||got - expected|| / ||expected||: 1e-2 on a GPU. The interpreter truncates fp32 ->
# bf16 where the reference rounds to nearest: over 300 seeds of the (1, 2, 64) norms (128 elements, the noisiest
# shape) it measured median 0.0067, p99 0.0094 and max 0.0103 for rms_norm / fused_add_rms_norm (session 31)
BF16_REL_BOUND = 1e-2 if CUDA else 1.5e-2


def _check(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Elementwise within `_tol`; for bf16 also the relative bound `BF16_REL_BOUND`."""
    torch.testing.assert_close(got, expected, **_tol(dtype))
    if dtype == torch.bfloat16:
        err = (got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)
        assert err.item() <= BF16_REL_BOUND, f"bf16 relative error {err.item():.3g} > {BF16_REL_BOUND}"


def _exact(dtype: torch.dtype) -> dict[str, float]:
    """Bitwise on GPU; one bf16 ulp under the interpreter (truncating conversion)."""
    if dtype == torch.bfloat16 and not CUDA:
        return {"atol": 1e-2, "rtol": 8e-3}
    return {"atol": 0.0, "rtol": 0.0}


def _poison_allocator() -> None:
    """Fill recently freed memory with NaN so ``torch.empty`` outputs start as garbage, not zeros."""
    junk = torch.full((1 << 20,), float("nan"), device=DEVICE)
    del junk


@contextmanager
def _triton(ir_op: IrOp, *args: object) -> Iterator[None]:
    with ir_op.priority(["triton"]):
        chosen, skipped = ir_op.explain(*args)
        assert chosen.name == "triton", f"triton not selected: {skipped}"
        _poison_allocator()
        yield


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)


# ------------------------------------------------------------------------------------------ norms
NORM_SHAPES = [(3, 576), (2, 1000), (2, 4097), (1, 2, 64)]
GPU_NORM_SHAPES = [(8192, 4096), (37, 5120), (1, 4097), (513, 576)]


def _check_norms(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> None:
    gen = _gen(seed)
    hidden = shape[-1]
    x, residual = _randn(gen, *shape, dtype=dtype), _randn(gen, *shape, dtype=dtype)
    weight = _randn(gen, hidden, dtype=dtype)
    eps = 1e-6
    for ir_op in (ops.rms_norm, ops.gemma_rms_norm):
        expected = ir_op.native(x, weight, eps)
        with _triton(ir_op, x, weight, eps):
            got = ir_op(x, weight, eps)
        assert got.dtype == x.dtype and got.shape == x.shape
        _check(got, expected, dtype)

    out_ref, res_ref = ops.fused_add_rms_norm.native(x, residual, weight, eps)
    with _triton(ops.fused_add_rms_norm, x, residual, weight, eps):
        out, res = ops.fused_add_rms_norm(x, residual, weight, eps)
    torch.testing.assert_close(res, res_ref, **_exact(dtype))
    _check(out, out_ref, dtype)

    x_, r_ = x.clone(), residual.clone()
    with _triton(ops.fused_add_rms_norm_, x_, r_, weight, eps):
        ops.fused_add_rms_norm_(x_, r_, weight, eps)
    torch.testing.assert_close(r_, res_ref, **_exact(dtype))
    _check(x_, out_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_norms(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    # a seed per case that is the same in every process (hash() of a str is salted per process)
    _check_norms(shape, dtype, seed=zlib.crc32(repr((shape, str(dtype))).encode()) % 1000)


def test_norm_in_place_on_strided_rows() -> None:
    gen = _gen(7)
    buf = _randn(gen, 4, 96, dtype=torch.float32)
    x, residual = buf[:, :48], buf[:, 48:]  # row stride 96: views of one buffer, written in place
    weight = _randn(gen, 48, dtype=torch.float32)
    out_ref, res_ref = ops.fused_add_rms_norm.native(x, residual, weight, 1e-5)
    with _triton(ops.fused_add_rms_norm_, x, residual, weight, 1e-5):
        ops.fused_add_rms_norm_(x, residual, weight, 1e-5)
    torch.testing.assert_close(buf[:, :48], out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(buf[:, 48:], res_ref, atol=0, rtol=0)
    transposed = torch.randn(8, 4, device=DEVICE).t()  # last dim strided: triton must decline
    assert ops.rms_norm.explain(transposed, torch.ones(8, device=DEVICE), 1e-5)[0].name == "native"


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_NORM_SHAPES)
def test_norms_gpu(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    _check_norms(shape, dtype, seed=11)


# ------------------------------------------------------------------------------------------ activations
def _check_activations(
    shape: tuple[int, ...], dtype: torch.dtype, seed: int, column_slice: bool = False
) -> None:
    gen = _gen(seed)
    x = _randn(gen, *shape, dtype=dtype) * 3
    if column_slice:  # rows strided by a wider buffer
        x = torch.cat((x, x[..., :5]), dim=-1)[..., : shape[-1]]
    for ir_op in (ops.silu_and_mul, ops.gelu_tanh_and_mul):
        expected = ir_op.native(x)
        with _triton(ir_op, x):
            got = ir_op(x)
        assert got.shape == (*shape[:-1], shape[-1] // 2)
        _check(got, expected, dtype)
    # gpt-oss's clamps (alpha 1.702, limit 7) engage: x * 3 reaches past +-7 in both halves
    expected = ops.swigluoai_and_mul.native(x, 1.702, 7.0)
    assert (x.float().abs() > 7.0).any()
    with _triton(ops.swigluoai_and_mul, x, 1.702, 7.0):
        got = ops.swigluoai_and_mul(x, 1.702, 7.0)
    assert got.shape == (*shape[:-1], shape[-1] // 2)
    _check(got, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 2 * 576), (2, 2 * 1000), (2, 3, 2 * 33)])
def test_activations(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    _check_activations(shape, dtype, seed=shape[-1])


def test_activation_on_column_slice() -> None:
    _check_activations((4, 64), torch.float32, seed=3, column_slice=True)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8192, 2 * 14336), (3, 2 * 4097), (257, 2 * 1000)])
def test_activations_gpu(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    _check_activations(shape, dtype, seed=5)


# ------------------------------------------------------------------------------------------ rotary
def _cos_sin_cache(max_pos: int, rot_dim: int, dtype: torch.dtype) -> torch.Tensor:
    inv_freq = 10000.0 ** (-torch.arange(0, rot_dim, 2, dtype=torch.float32, device=DEVICE) / rot_dim)
    angle = torch.arange(max_pos, dtype=torch.float32, device=DEVICE)[:, None] * inv_freq
    return torch.cat((angle.cos(), angle.sin()), dim=-1).to(dtype)  # [max_pos, rot_dim]


def _check_rotary(
    num_tokens: int,
    nh: int,
    nkv: int,
    head_size: int,
    rot_dim: int,
    is_neox: bool,
    dtype: torch.dtype,
    seed: int,
) -> None:
    gen = _gen(seed)
    max_pos = 4 * num_tokens + 8
    positions = torch.randint(0, max_pos, (num_tokens,), generator=gen, device=DEVICE)
    qkv = _randn(gen, num_tokens, (nh + 2 * nkv) * head_size, dtype=dtype)
    query, key, _ = qkv.split([nh * head_size, nkv * head_size, nkv * head_size], dim=-1)  # strided rows
    cache = _cos_sin_cache(max_pos, rot_dim, torch.float32)
    q_ref, k_ref = ops.rotary_embedding.native(positions, query, key, head_size, cache, is_neox)
    args = (positions, query, key, head_size, cache, is_neox)
    with _triton(ops.rotary_embedding, *args):
        q_out, k_out = ops.rotary_embedding(*args)
    _check(q_out, q_ref, dtype)
    _check(k_out, k_ref, dtype)
    value_before = qkv[:, (nh + nkv) * head_size :].clone()
    with _triton(ops.rotary_embedding_, *args):
        ops.rotary_embedding_(*args)
    _check(query, q_ref, dtype)
    _check(key, k_ref, dtype)
    assert torch.equal(qkv[:, (nh + nkv) * head_size :], value_before), "in-place rotary wrote outside q/k"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rot_dim", [32, 16])
def test_rotary(rot_dim: int, is_neox: bool, dtype: torch.dtype) -> None:
    _check_rotary(5, 4, 2, 32, rot_dim, is_neox, dtype, seed=rot_dim + is_neox)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rot_dim", [128, 64])
def test_rotary_gpu(rot_dim: int, is_neox: bool, dtype: torch.dtype) -> None:
    _check_rotary(4096, 32, 8, 128, rot_dim, is_neox, dtype, seed=1)


# ------------------------------------------------------------------------------------------ kv cache
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def _check_cache(
    num_tokens: int, nkv: int, head_size: int, num_blocks: int, block_size: int, dtype: torch.dtype,
    cache_dtype: torch.dtype | None = None,
) -> None:  # fmt: skip
    """``cache_dtype`` fp8: a third of the values lie past the format's largest finite value (saturation), the rest
    are arbitrary (round to nearest even, subnormals included); the bytes must equal the IR op's."""
    gen = _gen(num_tokens)
    kv = _randn(gen, num_tokens, 2 * nkv, head_size, dtype=dtype)
    if cache_dtype is not None:
        kv = (kv.float() * (torch.finfo(cache_dtype).max / 2)).to(dtype)
        kv[: num_tokens // 2, 0, :4] = torch.tensor([1e-3, -3 * 2.0**-10, 2.0**-18, 1.0625], dtype=dtype)
    key, value = kv[:, :nkv], kv[:, nkv:]  # strided token dim, like a slice of fused qkv
    perm = torch.randperm(num_blocks * block_size, generator=gen, device=DEVICE)[:num_tokens]
    slots = torch.where(torch.arange(num_tokens, device=DEVICE) % 3 == 1, -1, perm)  # every third is padding
    kv_cache = torch.full((2, num_blocks, block_size, nkv, head_size), float("nan"), device=DEVICE)
    kv_cache = kv_cache.to(cache_dtype or dtype)
    ref = kv_cache.clone()
    ops.reshape_and_cache.native(key, value, ref[0], ref[1], slots)
    with _triton(ops.reshape_and_cache, key, value, kv_cache[0], kv_cache[1], slots):
        ops.reshape_and_cache(key, value, kv_cache[0], kv_cache[1], slots)
    if cache_dtype is not None:  # fp8: compare the bytes (NaN where nothing was written)
        assert torch.equal(kv_cache.view(torch.uint8), ref.view(torch.uint8))
        assert float(ref.float().nan_to_num().abs().max()) == torch.finfo(cache_dtype).max
        return
    torch.testing.assert_close(kv_cache, ref, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_and_cache(dtype: torch.dtype) -> None:
    _check_cache(7, 2, 24, 3, 4, dtype)


@pytest.mark.parametrize("cache_dtype", FP8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reshape_and_cache_fp8(dtype: torch.dtype, cache_dtype: torch.dtype) -> None:
    _check_cache(7, 2, 24, 3, 4, dtype, cache_dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_and_cache_gpu(dtype: torch.dtype) -> None:
    _check_cache(4096, 8, 128, 1024, 16, dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("cache_dtype", FP8, ids=["e4m3", "e5m2"])
def test_reshape_and_cache_fp8_gpu(cache_dtype: torch.dtype) -> None:
    _check_cache(4096, 8, 128, 1024, 16, torch.bfloat16, cache_dtype)


# ------------------------------------------------------------------------------------------ report
def test_report_on_this_platform() -> None:
    import treadle_ir
    from treadle_ir.platforms import Platform
    from treadle_kernels.ops import linear_onednn

    text = treadle_ir.report()
    linear_ops = {"linear", "add_rms_norm_linear", "silu_and_mul_linear", "gelu_tanh_and_mul_linear"}
    host_ops = {"reshape_and_cache", "rotary_embedding_", "w4a16_linear"}  # ops/host.py, ops/w4a16_host.py
    for name in ops.__all__:
        line = next(line for line in text.splitlines() if line.startswith(f"{name}: "))
        onednn = (
            linear_onednn.supported(Platform(kind="cpu")) is True
        )  # x86-64 with oneDNN (linear_onednn.py)
        cpu = "onednn" if name in linear_ops and onednn else "cpu" if name in host_ops else "native"
        assert line.startswith(f"{name}: selected {'triton' if CUDA else cpu}"), line
    if not CUDA:
        assert "triton: skipped: not in the priority list ['onednn', 'cpu', 'native']" in text
