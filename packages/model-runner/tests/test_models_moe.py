"""Parity with HF transformers (CPU, fp32) for the sparse-MoE models, driven through the ModelRunner.

Qwen3-MoE (q/k norm, a dense layer from `mlp_only_layers`, renormalized top-k), Mixtral (sliding window short
enough to matter, w1/w3/w2 experts) and Qwen2-MoE (a shared expert scaled by its sigmoid gate beside the routed ones,
qkv bias, sliding-window layers), tiny random configs with 8 experts and top-2, saved by `save_pretrained`
(per-expert tensors on disk): one step mixing a fresh prefill, a chunked prefill continuing on cached blocks and
several decodes gives per-position logits within 1e-4 of HF, and greedy 32-token continuations equal HF
`generate`. Loading also accepts transformers' fused in-memory layout (`experts.gate_up_proj` /
`experts.down_proj`) and names missing expert matrices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from model_parity import check_greedy, check_mixed_batch, prefixed
from test_runner_fakes import FakeScheduler, make_runner, perturb_

from treadle_model_runner.loader import iterate_weights
from treadle_model_runner.loader.dummy import make_dummy_model_dir
from treadle_model_runner.models import get_model_class

VOCAB = 128
COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts_per_tok=2,
    max_position_embeddings=128,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=0,
)


def _config(arch: str) -> tuple[Any, Any]:
    config: Any
    if arch == "qwen3_moe":  # layer 0 dense (mlp_only_layers), layers 1-2 sparse, renormalized top-k
        config = tf.Qwen3MoeConfig(
            **COMMON, num_hidden_layers=3, num_experts=8, moe_intermediate_size=32, intermediate_size=96,
            norm_topk_prob=True, mlp_only_layers=[0], decoder_sparse_step=1,
        )  # fmt: skip
        return config, tf.Qwen3MoeForCausalLM
    if arch == "qwen3_moe_step2":  # decoder_sparse_step 2: layer 1 sparse, layer 0 dense; no renormalization
        config = tf.Qwen3MoeConfig(
            **COMMON, num_hidden_layers=2, num_experts=4, moe_intermediate_size=32, intermediate_size=48,
            norm_topk_prob=False, decoder_sparse_step=2, tie_word_embeddings=True,
        )  # fmt: skip
        return config, tf.Qwen3MoeForCausalLM
    if arch == "mixtral":  # sliding window over every layer, short enough to matter
        config = tf.MixtralConfig(
            **COMMON, num_hidden_layers=2, num_local_experts=8, intermediate_size=48, sliding_window=7
        )
        return config, tf.MixtralForCausalLM
    # qwen2_moe: shared expert with its sigmoid gate, qkv bias, a dense layer, sliding layers 0 and 2
    if arch == "qwen2_moe":
        config = tf.Qwen2MoeConfig(
            **COMMON, num_hidden_layers=3, num_experts=8, moe_intermediate_size=32, intermediate_size=96,
            shared_expert_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[1],
            use_sliding_window=True, sliding_window=7, max_window_layers=3,
        )  # fmt: skip
        return config, tf.Qwen2MoeForCausalLM
    raise AssertionError(arch)


ARCHS = ["qwen3_moe", "qwen3_moe_step2", "mixtral", "qwen2_moe"]


def _tiny_hf(arch: str) -> Any:
    config, cls = _config(arch)
    torch.manual_seed(ARCHS.index(arch))
    hf = cls(config).eval()
    perturb_(hf, seed=1, std=0.15)
    return hf


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    hf = _tiny_hf(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    return hf, path


def test_checkpoint_stores_experts_one_matrix_each(tiny: tuple[Any, Path]) -> None:
    """The parity tests below load what save_pretrained writes: per-expert matrices (guards the premise)."""
    _, path = tiny
    names = [name for name, _ in iterate_weights(path, "safetensors")]
    assert any(".experts.0." in name for name in names), names
    assert not any(name.endswith(("experts.gate_up_proj", "experts.down_proj")) for name in names), names


def test_mixed_batch_logits_match_hf(tiny: tuple[Any, Path]) -> None:
    check_mixed_batch(*tiny, vocab_size=VOCAB)


def test_greedy_continuations_match_hf_generate(tiny: tuple[Any, Path]) -> None:
    check_greedy(*tiny, vocab_size=VOCAB)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_fused_layout_loads_like_per_expert(arch: str, tmp_path: Path) -> None:
    """transformers' in-memory names (experts.gate_up_proj [E, 2N, K], experts.down_proj [E, K, N], Mixtral
    `mlp.`) load the same parameters as the per-expert checkpoint save_pretrained writes."""
    hf = _tiny_hf(arch)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    fused_state = hf.state_dict()
    assert any(name.endswith("experts.gate_up_proj") for name in fused_state), list(fused_state)
    cls = get_model_class(hf.config)
    from_disk: Any = cls(hf.config)
    from_fused: Any = cls(hf.config)
    with torch.no_grad():
        from_disk.load_weights(iterate_weights(tmp_path, "safetensors"))
        from_fused.load_weights(fused_state.items())
    fused_params = dict(from_fused.named_parameters())
    for name, param in from_disk.named_parameters():
        torch.testing.assert_close(fused_params[name], param, atol=0, rtol=0, msg=prefixed(name))
    experts = hf.model.layers[1].mlp.experts
    ours = from_fused.model.layers[1].mlp.experts
    torch.testing.assert_close(ours.w13_weight, experts.gate_up_proj.detach(), atol=0, rtol=0)
    torch.testing.assert_close(ours.w2_weight, experts.down_proj.detach(), atol=0, rtol=0)


def test_missing_expert_matrix_is_named(tmp_path: Path) -> None:
    hf = _tiny_hf("mixtral")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    dropped = "model.layers.1.block_sparse_moe.experts.5.w3.weight"
    weights = [(name, t) for name, t in iterate_weights(tmp_path, "safetensors") if name != dropped]
    assert len(weights) == len(list(iterate_weights(tmp_path, "safetensors"))) - 1
    model = get_model_class(hf.config)(hf.config)
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.w13_weight\[expert 5, up\]"),
    ):
        model.load_weights(weights)


def test_fused_tensor_with_wrong_shape_is_rejected() -> None:
    hf = _tiny_hf("qwen3_moe")
    state = dict(hf.state_dict())
    name = "model.layers.2.mlp.experts.down_proj"
    state[name] = state[name].transpose(1, 2).contiguous()  # [E, N, K]: a transposed exporter
    model = get_model_class(hf.config)(hf.config)
    with torch.no_grad(), pytest.raises(ValueError, match=r"down_proj.*\(8, 32, 64\).*\(8, 64, 32\)"):
        model.load_weights(state.items())


@pytest.mark.parametrize(("arch", "sparse_layer"), [("qwen3_moe", 1), ("qwen2_moe", 0)])
def test_dummy_weights_fill_experts_and_generate(arch: str, sparse_layer: int, tmp_path: Path) -> None:
    """load_format='dummy' (the benchmark path) fills the expert stacks and the model generates."""
    config, _ = _config(arch)
    runner = make_runner(make_dummy_model_dir(config, tmp_path), load_format="dummy")
    model: Any = runner._require_model()
    experts = model.model.layers[sparse_layer].mlp.experts
    assert 0.01 < float(experts.w13_weight.std()) < 0.04 and 0.01 < float(experts.w2_weight.std()) < 0.04
    sched = FakeScheduler(runner, seed=1)
    sched.add("a", [1, 2, 3, 4, 5], max_tokens=8)
    assert len(sched.run(budget=16)["a"]) == 8
    assert "torch" in experts.describe().lower(), experts.describe()


def test_shared_expert_block_all_reduces_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Qwen2-MoE's block sums the ranks' routed and shared-expert partial outputs with one all-reduce (the sigmoid
    gate is the same on every rank), not one each; counted on one rank, where all_reduce is the identity, and the
    output is the two terms' sum as the model defines it."""
    import treadle_model_runner.layers.linear as linear
    import treadle_model_runner.layers.mlp as mlp
    import treadle_model_runner.models.qwen2_moe as qwen2_moe
    import treadle_model_runner.models.sparse_moe as sparse_moe

    hf = _tiny_hf("qwen2_moe")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    block = make_runner(tmp_path, 4, 32).model.model.layers[0].mlp  # type: ignore[union-attr]
    assert isinstance(block, qwen2_moe.SharedExpertMoeBlock)
    x = torch.randn(5, COMMON["hidden_size"], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        routed = block.experts(x, block.gate(x))
        want = routed + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    calls: list[int] = []
    for module in (linear, mlp, qwen2_moe, sparse_moe):
        monkeypatch.setattr(module, "all_reduce", lambda t: calls.append(1) or t, raising=False)
    with torch.no_grad():
        got = block(x)
    assert len(calls) == 1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
