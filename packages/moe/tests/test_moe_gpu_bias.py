"""GPU: Triton fused MoE with gpt-oss's expert biases and swigluoai at gpt-oss-20b sizes (H 2880, N 2880, 32 experts,
top 4, bf16) against the torch reference experts; expert parallelism's -1 ids; the layer in a CUDA graph."""

from __future__ import annotations

import pytest
import torch
from bias_cases import run
from moe_cases import check_graph_replays_layer, tolerance

from treadle_moe import FusedMoE
from treadle_moe.experts.epilogue import ExpertEpilogue

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

HIDDEN, INTER, EXPERTS, TOP_K = 2880, 2880, 32, 4  # gpt-oss-20b


@pytest.fixture(scope="module")
def experts() -> dict[str, torch.Tensor]:
    """Random bf16 expert weights and O(1) biases of gpt-oss-20b's shapes, made on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(torch.bfloat16)

    return {
        "w13": randn(EXPERTS, 2 * INTER, HIDDEN, scale=HIDDEN**-0.5),
        "w2": randn(EXPERTS, HIDDEN, INTER, scale=INTER**-0.5),
        "b13": randn(EXPERTS, 2 * INTER),
        "b2": randn(EXPERTS, HIDDEN, scale=4.0),
    }


def _routed(experts: dict[str, torch.Tensor], tokens: int, seed: int) -> dict[str, torch.Tensor]:
    """Hidden states (std 4: some gate / up pre-activations pass the limit 7) and gpt-oss routing."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = (4 * torch.randn(tokens, HIDDEN, device="cuda", generator=gen)).to(torch.bfloat16)
    top_logits, ids = torch.randn(tokens, EXPERTS, device="cuda", generator=gen).topk(TOP_K, dim=-1)
    return dict(experts, hidden=hidden, topk_weights=top_logits.softmax(-1), topk_ids=ids.to(torch.int32))


def _assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.isfinite(out).all(), "non-finite values in the MoE output"
    scale = ref.float().abs().max()
    atol, rtol = tolerance(torch.bfloat16)
    torch.testing.assert_close(out.float() / scale, ref.float() / scale, atol=atol, rtol=rtol)


@pytest.mark.parametrize("tokens", [1, 7, 64, 512])
@pytest.mark.parametrize("combo", ["standard-triton", "batched-triton"])
def test_gpt_oss_20b_sizes_match_reference(experts: dict[str, torch.Tensor], combo: str, tokens: int) -> None:
    inputs = _routed(experts, tokens, seed=tokens)
    epilogue = ExpertEpilogue(inputs["b13"], inputs["b2"])
    out = run(combo, inputs, "swigluoai", epilogue)
    ref = run("standard-torch", inputs, "swigluoai", epilogue)
    _assert_close(out, ref)
    plain = run("standard-torch", inputs, "swigluoai", ExpertEpilogue())
    assert not torch.allclose(out.float(), plain.float(), atol=0.5), "the biases changed nothing"


@pytest.mark.parametrize("tokens", [7, 512])
def test_expert_parallel_rank_and_no_down_bias(experts: dict[str, torch.Tensor], tokens: int) -> None:
    """A rank holding experts 0..15 of 32 (the others' slots -1) on a TP rank but one (no down bias)."""
    inputs = _routed(experts, tokens, seed=100 + tokens)
    inputs["topk_ids"] = torch.where(inputs["topk_ids"] >= EXPERTS // 2, -1, inputs["topk_ids"])
    held = {name: inputs[name][: EXPERTS // 2] for name in ("w13", "w2", "b13")}
    inputs.update(held)
    epilogue = ExpertEpilogue(held["b13"], None)
    out = run("standard-triton", inputs, "swigluoai", epilogue, routed_experts=EXPERTS)
    _assert_close(out, run("standard-torch", inputs, "swigluoai", epilogue))


def test_layer_picks_triton_and_captures_in_cuda_graph(experts: dict[str, torch.Tensor]) -> None:
    layer = FusedMoE(EXPERTS, TOP_K, HIDDEN, INTER, dtype=torch.bfloat16, device="cuda", activation="swigluoai",
                     bias=True)  # fmt: skip
    assert layer.w13_bias is not None and layer.w2_bias is not None
    for param, name in ((layer.w13_weight, "w13"), (layer.w2_weight, "w2"), (layer.w13_bias, "b13"),
                        (layer.w2_bias, "b2")):  # fmt: skip
        param.data.copy_(experts[name])
    x = 4 * torch.randn(64, HIDDEN, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(64, EXPERTS, device="cuda")
    eager = layer(x, logits)
    assert "triton_fused" in layer.describe() and "expert biases" in layer.describe()
    reference = FusedMoE(EXPERTS, TOP_K, HIDDEN, INTER, dtype=torch.bfloat16, device="cuda", activation="swigluoai",
                         bias=True, backend="torch")  # fmt: skip
    reference.load_state_dict(layer.state_dict())
    _assert_close(eager, reference(x, logits))
    check_graph_replays_layer(layer, x, logits, eager)
