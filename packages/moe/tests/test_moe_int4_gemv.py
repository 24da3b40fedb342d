"""The small-batch 4-bit GEMV kernel (experts/triton_int4_gemv.py) against the torch reference, and its dispatch.

On CPU the kernel runs in the Triton interpreter (conftest.py sets TRITON_INTERPRET) on tiny problems: every layout of
int4_cases.py (groups of 16 and 32 that tile a K step, 24 and act order that gather each row's group, one group per
column), K not a multiple of the K step (48 in one partial step; 200 in a full and a partial one), N not a multiple of
BLOCK_N (48, 40), 1..8 tokens, top_k 1..4; both GEMMs launched directly (gated with silu / gelu_tanh, and the
routing-weight multiply) with BLOCK_M 1, 2 and 8 in alignment blocks of 4 and 16 slots (several passes over a block,
a partial last one); the whole layer in both activation formats; the dispatch and its environment variable; and an
ahead-of-time sm_90 compile of every layout (compile_int4_gemv_sm90.py: no register spills).
fp32 within 1e-5 of the reference; bf16 within a few % (the interpreter's fp32 -> bf16 conversion truncates).
The GPU tests (`gpu` marker) run Qwen3-30B-A3B's sizes (hidden 2048, moe intermediate 768, 128 experts, top-8,
groups of 128) against the spec and against the tl.dot kernel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from int4_cases import GPU_LAYOUTS, LAYOUTS, make_int4_inputs, moe_int4_spec
from moe_cases import COMBOS, DEVICE

from treadle_moe import ModularKernel, NoEPStandardPrepareFinalize, TritonExperts
from treadle_moe.experts import triton_int4
from treadle_moe.experts.align import align_block_size

GEMV_ENV = "TREADLE_MOE_INT4_GEMV_MAX_TOKENS"
# (tokens, hidden K, intermediate N, experts, top_k)
SHAPES = [(1, 48, 48, 8, 1), (3, 48, 40, 8, 2), (8, 200, 48, 6, 4), (5, 200, 40, 8, 3)]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def run_moe(
    combo: str, inputs: dict[str, torch.Tensor], scales: object, activation: str = "silu"
) -> torch.Tensor:
    pf_cls, experts_cls, _ = COMBOS[combo]
    kernel = ModularKernel(pf_cls(), experts_cls())
    args = (inputs["hidden"], inputs["w13"], inputs["w2"], inputs["topk_weights"], inputs["topk_ids"])
    return kernel(*args, activation, int4=scales)


@pytest.fixture
def gemv(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batch size takes the GEMV kernel."""
    monkeypatch.setenv(GEMV_ENV, "1000000")


@pytest.mark.usefixtures("gemv")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gemv_moe_matches_the_torch_reference(layout: str, shape: tuple[int, ...]) -> None:
    inputs, scales = make_int4_inputs(layout, *shape, torch.float32, seed=sum(shape))
    got = run_moe("standard-triton", inputs, scales)
    assert relative_error(got, run_moe("standard-torch", inputs, scales)) < 1e-5
    assert relative_error(got, moe_int4_spec(inputs)) < 1e-5


@pytest.mark.usefixtures("gemv")
@pytest.mark.parametrize("layout", ["g16-asym", "g24-asym", "g16-sym-act-order"])
@pytest.mark.parametrize("combo", ["standard-triton", "batched-triton"])
def test_gemv_moe_bf16_gelu(combo: str, layout: str) -> None:
    inputs, scales = make_int4_inputs(layout, 6, 64, 40, 8, 2, torch.bfloat16, seed=5)
    got = run_moe(combo, inputs, scales, "gelu_tanh")
    # the interpreter's truncating bf16 conversion: 1-2 %
    tolerance = 4e-2 if DEVICE == "cpu" else 1e-2
    assert relative_error(got, moe_int4_spec(inputs, "gelu_tanh")) < tolerance


@pytest.mark.usefixtures("gemv")
@pytest.mark.parametrize("layout", ["g32-sym", "g16-asym-act-order"])
def test_gemv_batched_format(layout: str) -> None:
    inputs, scales = make_int4_inputs(layout, 7, 48, 48, 8, 2, torch.float32, seed=2, skip_experts=2)
    assert relative_error(run_moe("batched-triton", inputs, scales), moe_int4_spec(inputs)) < 1e-5


def reference_gemm(a: torch.Tensor, deq: torch.Tensor, ids: torch.Tensor, rows_per_token: int, gated: bool,
                   activation: str, weights: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """One expert GEMM per slot as the kernel's contract: [slots, cols] rounded, act(gate) * up, * weight."""
    slots = torch.arange(ids.numel(), device=a.device)
    # [slots, K]
    x = a[slots // rows_per_token].float()
    h = torch.einsum("sk,sck->sc", x, deq[ids.long()].float()).to(a.dtype).float()
    if gated:
        n = h.shape[1] // 2
        gate = h[:, :n]
        h = (F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")) * h[:, n:]
    if weights is not None:
        h = h * weights[:, None]
    return h.to(a.dtype)


@pytest.mark.parametrize(("align_m", "block_m"), [(4, 2), (16, 1), (16, 8)])
@pytest.mark.parametrize("layout", ["g16-asym", "g32-sym", "channel-sym", "g16-asym-act-order"])
def test_gemv_gemms_every_block_size(layout: str, align_m: int, block_m: int) -> None:
    """Both GEMMs launched directly: alignment blocks of align_m slots walked block_m at a time; 12 tokens, top-3 of
    4 experts put up to 12 slots on one expert, so a block's slots take several passes."""
    from treadle_moe.experts.triton_int4_gemv import GemvConfig, invoke_moe_w4a16_gemv

    tokens, k, n, e, top_k = 12, 200, 40, 4, 3
    inputs, scales = make_int4_inputs(layout, tokens, k, n, e, top_k, torch.float32, seed=block_m + align_m)
    alignment = align_block_size(inputs["topk_ids"], align_m, e)
    ids = inputs["topk_ids"].reshape(-1)
    weights = inputs["topk_weights"].reshape(-1).float().contiguous()
    config = GemvConfig(block_m=block_m, block_n=32, block_k=128, num_warps=4)
    for gated, activation in ((True, "silu"), (True, "gelu_tanh"), (False, "silu")):
        if gated:
            a, rows_per_token, c_cols, mul = inputs["hidden"], top_k, n, None
            w_scale, zero, g_idx = scales.w13_scale, scales.w13_zero, scales.w13_g_idx
        else:
            a, rows_per_token, c_cols, mul = torch.randn(tokens * top_k, n, device=DEVICE), 1, k, weights
            w_scale, zero, g_idx = scales.w2_scale, scales.w2_zero, scales.w2_g_idx
        which = "w13" if gated else "w2"
        b, deq = inputs[which], inputs[f"{which}_deq"]
        c = torch.full((tokens * top_k, c_cols), float("nan"), device=DEVICE)
        invoke_moe_w4a16_gemv(a, b, w_scale, zero, g_idx, c, mul, alignment, config, scales.layout,
                              a_rows_per_token=rows_per_token, gated=gated, activation=activation)  # fmt: skip
        expected = reference_gemm(a, deq, ids, rows_per_token, gated, activation, mul)
        assert relative_error(c, expected) < 1e-5, (gated, activation)


@pytest.mark.parametrize(
    ("env", "tokens", "expected"),
    [(None, 1, True), (None, 16, True), (None, 17, False), ("0", 1, False), ("5", 5, True), ("5", 6, False)],
)
def test_use_gemv_threshold(
    monkeypatch: pytest.MonkeyPatch, env: str | None, tokens: int, expected: bool
) -> None:
    """Default: up to E / top_k tokens (16 at 128 experts, top-8); the variable overrides it, 0 disables."""
    if env is None:
        monkeypatch.delenv(GEMV_ENV, raising=False)
    else:
        monkeypatch.setenv(GEMV_ENV, env)
    assert triton_int4.use_gemv(tokens, 128, 8) is expected


def test_bad_threshold_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GEMV_ENV, "lots")
    with pytest.raises(ValueError, match=GEMV_ENV):
        triton_int4.use_gemv(1, 128, 8)


@pytest.mark.parametrize(("env", "tokens", "kernel"), [(None, 2, "gemv"), (None, 9, "dot"), ("0", 2, "dot")])
def test_dispatch_picks_the_kernel(
    monkeypatch: pytest.MonkeyPatch, env: str | None, tokens: int, kernel: str
) -> None:
    """8 experts, top-2: the default threshold is 8 tokens; both GEMMs go to the picked kernel, and the result is
    the reference's either way."""
    from treadle_moe.experts import triton_int4_gemv

    if env is None:
        monkeypatch.delenv(GEMV_ENV, raising=False)
    else:
        monkeypatch.setenv(GEMV_ENV, env)
    calls: list[str] = []

    def recording(name: str, launch):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(name)
            return launch(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        triton_int4_gemv, "invoke_moe_w4a16_gemv", recording("gemv", triton_int4_gemv.invoke_moe_w4a16_gemv)
    )
    monkeypatch.setattr(
        triton_int4, "invoke_moe_w4a16_gemm", recording("dot", triton_int4.invoke_moe_w4a16_gemm)
    )
    inputs, scales = make_int4_inputs("g16-asym", tokens, 48, 48, 8, 2, torch.float32, seed=tokens)
    got = run_moe("standard-triton", inputs, scales)
    assert calls == [kernel, kernel]
    assert relative_error(got, moe_int4_spec(inputs)) < 1e-5


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's compiler ships for Linux")
def test_gemv_compiles_for_sm90_without_spills() -> None:
    """Every layout and BLOCK_M compiles for Hopper (the interpreter accepts code the compiler rejects) and keeps
    its registers (compile_int4_gemv_sm90.py)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_int4_gemv_sm90.py")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "compiled for sm_90" in proc.stdout


GPU_K, GPU_N, GPU_E, GPU_TOP_K = 2048, 768, 128, 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 4, 16, 32])
@pytest.mark.parametrize("layout", list(GPU_LAYOUTS))
def test_gpu_real_size_gemv(monkeypatch: pytest.MonkeyPatch, layout: str, tokens: int) -> None:
    """Qwen3-30B-A3B's sizes: the GEMV (the default up to 16 tokens here, forced past it) against the spec and the
    tl.dot kernel."""
    if tokens <= GPU_E // GPU_TOP_K:
        monkeypatch.delenv(GEMV_ENV, raising=False)
    else:
        monkeypatch.setenv(GEMV_ENV, str(tokens))
    assert triton_int4.use_gemv(tokens, GPU_E, GPU_TOP_K)
    inputs, scales = make_int4_inputs(layout, tokens, GPU_K, GPU_N, GPU_E, GPU_TOP_K, torch.bfloat16, "cuda",
                                      seed=tokens)  # fmt: skip
    out = run_moe("standard-triton", inputs, scales)
    assert relative_error(out, moe_int4_spec(inputs)) < 1e-2
    monkeypatch.setenv(GEMV_ENV, "0")
    assert relative_error(out, run_moe("standard-triton", inputs, scales)) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_gemv_captures_in_cuda_graph() -> None:
    inputs, scales = make_int4_inputs("g128-asym", 4, GPU_K, GPU_N, GPU_E, GPU_TOP_K, torch.bfloat16, "cuda")
    kernel = ModularKernel(NoEPStandardPrepareFinalize(), TritonExperts())
    args = (inputs["hidden"], inputs["w13"], inputs["w2"], inputs["topk_weights"], inputs["topk_ids"])
    eager = kernel(*args, int4=scales)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = kernel(*args, int4=scales)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed, eager)
