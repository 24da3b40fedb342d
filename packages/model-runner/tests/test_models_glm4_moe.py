"""GLM-4.5 (`Glm4MoeForCausalLM`) against HF transformers on a tiny random config (CPU, fp32).

The config exercises every part of the family: layer 0 dense (`first_k_dense_replace` 1), layers 1-2 MoE with 16
sigmoid-scored experts in 4 groups of which 2 stay eligible (top 3), a random non-zero `e_score_correction_bias`
(HF initialises it to zeros), `routed_scaling_factor` 2.5, renormalized weights, two shared experts' worth of shared
MLP; heads of 32 dims (q wider than the hidden size), half of them rotating, q/k norms, q/k/v biases. The checkpoint
also holds a multi-token-prediction layer (`model.layers.3.*`, as the real ones store it), which is skipped.
- The premise: grouping, the bias and the scaling each change the routing; our router equals HF's Glm4MoeTopkRouter.
- Parity (model_parity): a mixed step's per-position logits within 1e-4 of HF, greedy continuations equal to HF's.
- Loading: the MTP layer is neither built nor loaded (logged); a missing correction bias is named.
- Two ranks (gloo) under tensor parallelism and under expert parallelism give the one-rank tokens and logprobs.
- Dummy weights (load_format='dummy') build and run the family.
- On CUDA (marked gpu): the parity again on the torch and Triton backends and with CUDA graphs, the routed experts
  on the Triton fused-MoE kernel.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from model_parity import check_greedy, check_mixed_batch
from safetensors.torch import load_file, save_file
from test_quantization_fp8_parallel import check_same_greedy, greedy_with_logprobs
from test_runner_fakes import FakeScheduler, make_runner, perturb_
from test_runner_parallel import two_rank_results

from treadle_model_runner.loader import iterate_weights, make_dummy_model_dir
from treadle_model_runner.models import get_model_class
from treadle_model_runner.models.glm4_moe import Glm4MoeBlock, Glm4MoeForCausalLM
from treadle_model_runner.parallel import destroy_tensor_parallel, init_tensor_parallel

VOCAB = 128
CONFIG: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=16,
    num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=2, first_k_dense_replace=1,
    routed_scaling_factor=2.5, norm_topk_prob=True, use_qk_norm=True, attention_bias=True,
    partial_rotary_factor=0.5, num_nextn_predict_layers=1, max_position_embeddings=128,
    tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=0,
)  # fmt: skip
MTP_PREFIX = "model.layers.3."


def _tiny_hf() -> Any:
    config = tf.Glm4MoeConfig(**CONFIG)
    assert config.rope_parameters["partial_rotary_factor"] == 0.5
    torch.manual_seed(0)
    hf = tf.Glm4MoeForCausalLM(config).eval()
    perturb_(hf, seed=1, std=0.15)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in hf.model.layers[1:]:  # a buffer, which perturb_ leaves at HF's zeros
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(16, generator=gen) * 0.2)
    return hf


def _save_with_mtp_layer(hf: Any, path: Path) -> None:
    """save_pretrained, plus an MTP layer's tensors as GLM-4.5's files hold them: a whole decoder layer past the
    last one and its own embedding, norms, projection and head."""
    hf.save_pretrained(path, safe_serialization=True)
    file = path / "model.safetensors"
    tensors = load_file(file)
    mtp = {MTP_PREFIX + k.removeprefix("model.layers.2."): v.clone()
           for k, v in tensors.items() if k.startswith("model.layers.2.")}  # fmt: skip
    hidden = CONFIG["hidden_size"]
    for name, shape in {"enorm.weight": (hidden,), "hnorm.weight": (hidden,), "eh_proj.weight": (hidden, 2 * hidden),
                        "shared_head.norm.weight": (hidden,), "shared_head.head.weight": (VOCAB, hidden),
                        "embed_tokens.weight": (VOCAB, hidden)}.items():  # fmt: skip
        mtp[MTP_PREFIX + name] = torch.randn(shape)
    save_file({**tensors, **mtp}, file, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    hf = _tiny_hf()
    path = tmp_path_factory.mktemp("glm4_moe")
    _save_with_mtp_layer(hf, path)
    return hf, path


def _loaded(path: Path) -> Glm4MoeForCausalLM:
    model = Glm4MoeForCausalLM(tf.Glm4MoeConfig.from_pretrained(path))
    with torch.no_grad():
        model.load_weights(iterate_weights(path, "safetensors"))
    return model


def _hf_choice(scores: torch.Tensor, bias: torch.Tensor, groups: int, topk_group: int) -> torch.Tensor:
    """Sorted top-3 expert ids of (scores + bias) among the `topk_group` best of `groups` groups (top-2 sums)."""
    choice = scores + bias
    group_scores = choice.view(len(choice), groups, -1).topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(
        1, group_scores.topk(topk_group).indices, True
    )
    masked = choice.masked_fill(~keep.repeat_interleave(16 // groups, dim=1), float("-inf"))
    return masked.topk(3).indices.sort().values


def test_router_matches_hf_and_each_routing_rule_matters(tiny: tuple[Any, Path]) -> None:
    hf, path = tiny
    block = _loaded(path).model.layers[1].mlp
    assert isinstance(block, Glm4MoeBlock)
    x = torch.randn(64, CONFIG["hidden_size"], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, hf_weights, hf_ids = hf.model.layers[1].mlp.gate(x)
        weights, ids = block.experts.router.select(
            block.gate(x.float()), block.experts.e_score_correction_bias
        )
    order, hf_order = ids.argsort(dim=1), hf_ids.argsort(dim=1)
    assert torch.equal(ids.long().gather(1, order), hf_ids.gather(1, hf_order))
    torch.testing.assert_close(weights.gather(1, order), hf_weights.gather(1, hf_order), rtol=0, atol=1e-6)
    assert torch.allclose(weights.sum(1), torch.full((64,), 2.5))  # renormalized, then scaled
    # the premise: without the groups, or without the bias, other experts would be picked
    scores, bias = logits.sigmoid(), hf.model.layers[1].mlp.gate.e_score_correction_bias
    chosen = hf_ids.sort().values
    assert torch.equal(_hf_choice(scores, bias, 4, 2), chosen)
    assert not torch.equal(_hf_choice(scores, bias, 4, 4), chosen)
    assert not torch.equal(_hf_choice(scores, torch.zeros_like(bias), 4, 2), chosen)


def test_mixed_batch_logits_match_hf(tiny: tuple[Any, Path]) -> None:
    check_mixed_batch(*tiny, vocab_size=VOCAB)


def test_greedy_continuations_match_hf_generate(tiny: tuple[Any, Path]) -> None:
    check_greedy(*tiny, vocab_size=VOCAB)


def test_mtp_layer_is_skipped(tiny: tuple[Any, Path], caplog: pytest.LogCaptureFixture) -> None:
    _, path = tiny
    names = {name for name, _ in iterate_weights(path, "safetensors")}
    # the premise: the file holds the layer, its routed experts included
    assert {MTP_PREFIX + "eh_proj.weight", MTP_PREFIX + "mlp.experts.15.down_proj.weight"} <= names
    with caplog.at_level(logging.INFO, logger="treadle_model_runner.models.glm4_moe"):
        model = _loaded(path)
    assert get_model_class(model.config) is Glm4MoeForCausalLM
    assert len(model.model.layers) == 3 and not any(
        n.startswith(MTP_PREFIX) for n, _ in model.named_parameters()
    )
    assert any("multi-token-prediction layers 3-3" in m for m in caplog.messages), caplog.messages
    # o_proj has no bias although attention_bias is set (HF's), and q/k/v have theirs
    attn = model.model.layers[0].self_attn
    assert attn.o_proj.bias is None and attn.qkv_proj.bias is not None


def test_missing_correction_bias_is_named(tiny: tuple[Any, Path]) -> None:
    _, path = tiny
    dropped = "model.layers.2.mlp.gate.e_score_correction_bias"
    weights = [(n, t) for n, t in iterate_weights(path, "safetensors") if n != dropped]
    model = Glm4MoeForCausalLM(tf.Glm4MoeConfig.from_pretrained(path))
    with torch.no_grad(), pytest.raises(ValueError, match=dropped.replace(".", r"\.")):
        model.load_weights(weights)


def _rank_main(rank: int, init_method: str, path: Path, results: Any) -> None:
    try:
        torch.set_num_threads(1)
        init_tensor_parallel(rank, 2, init_method, torch.device("cpu"))
        got = {
            "tp": greedy_with_logprobs(make_runner(path, tensor_parallel_size=2)),
            "ep": greedy_with_logprobs(
                make_runner(path, tensor_parallel_size=2, enable_expert_parallel=True)
            ),
        }
        destroy_tensor_parallel()
        results.put((rank, got))
    except BaseException:
        results.put((rank, traceback.format_exc()))
        raise


def test_two_ranks_match_one_under_tensor_and_expert_parallelism(tiny: tuple[Any, Path]) -> None:
    """The shared MLP, the experts' columns (tp) or whole experts (ep) split, the router and its bias replicated."""
    _, path = tiny
    by_rank = two_rank_results(_rank_main, path)
    expected = greedy_with_logprobs(make_runner(path))
    for rank, got in by_rank.items():
        for mode in ("tp", "ep"):
            check_same_greedy(got[mode], expected, (mode, rank))


def test_dummy_weights_generate(tmp_path: Path) -> None:
    runner = make_runner(make_dummy_model_dir(tf.Glm4MoeConfig(**CONFIG), tmp_path), load_format="dummy")
    experts = runner._require_model().model.layers[1].mlp.experts  # type: ignore[union-attr]
    assert 0.01 < float(experts.w13_weight.std()) < 0.04
    assert experts.e_score_correction_bias.dtype == torch.float32
    sched = FakeScheduler(runner, seed=1)
    sched.add("a", [1, 2, 3, 4, 5], max_tokens=8)
    assert len(sched.run(budget=16)["a"]) == 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("backend", "eager"), [("torch", True), ("triton", True), ("triton", False)],
                         ids=["torch", "triton", "graphs"])  # fmt: skip
def test_gpu_fp32_matches_hf(tiny: tuple[Any, Path], backend: str, eager: bool) -> None:
    """On CUDA the routed experts run the Triton fused-MoE kernel (fp32) with the grouped, biased routing: a mixed
    step within 2e-3 of HF (CPU) and greedy continuations equal, eagerly and with CUDA graphs."""
    hf, path = tiny
    runner = dict(device="cuda", attention_backend=backend, enforce_eager=eager, block_size=16, num_blocks=64,
                  max_model_len=128)  # fmt: skip
    check_mixed_batch(hf, path, VOCAB, atol=2e-3, **runner)
    check_greedy(hf, path, VOCAB, **runner)
    torch.cuda.empty_cache()
