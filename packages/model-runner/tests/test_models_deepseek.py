"""DeepSeek-V2 (`DeepseekV2ForCausalLM`) and DeepSeek-V3 (`DeepseekV3ForCausalLM`) against HF transformers on tiny
random configs (CPU, fp32), and the latent KV cache they run on.

- V2: no q LoRA (q_proj), softmax routing with group_limited_greedy (8 experts in 4 groups, 2 kept, top 3), scaling
  1.5, YaRN with mscale 0.707 / mscale_all_dim 1.0 (so cos/sin carry an attention factor and the softmax scale an
  mscale^2); V3: q LoRA (q_a_proj, q_a_layernorm, q_b_proj), noaux_tc routing with a random correction bias, YaRN
  with mscale 1.0 / 1.0, rope_interleave, and a multi-token-prediction layer in the files (skipped). Both: layer 0
  dense, layers 1-2 MoE with a shared expert; heads of 16 nope + 16 rope dims, values of 24, a latent of 32.
- Routing: V2's greedy and group_limited_greedy equal HF's DeepseekV2TopkRouter.
- Parity (model_parity): a mixed step's per-position logits within 1e-4 of HF, greedy continuations equal to HF's.
- The KV cache: one tensor of latent + rope (48) dims a token per layer, seen as K and V (a stride-0 view), and
  bytes_per_block counts it once.
- Loading: a kv_b_proj of the wrong shape is named; the MTP layer is skipped.
- Refusals: FlashInfer (no shared key/value cache), LoRA, 4-bit weights, each by name (fp8: test_quantization_fp8_deepseek.py).
- The Triton backend (interpreter) equals the torch backend on the V3 model, over a model-dtype and an e4m3 latent cache.
Two ranks: test_models_deepseek_parallel.py; GPU checks: test_models_deepseek_gpu.py.
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from model_parity import check_greedy_runner, check_mixed_batch
from safetensors.torch import load_file, save_file
from test_runner_fakes import make_runner, perturb_, run_interpreted

from treadle_model_runner.kv_cache import bytes_per_block
from treadle_model_runner.loader import iterate_weights
from treadle_model_runner.models import get_model_class
from treadle_model_runner.models.deepseek import (
    DeepseekMoeBlock,
    DeepseekV2ForCausalLM,
    DeepseekV3ForCausalLM,
    v2_routing,
)
from treadle_model_runner.runner.setup import check_backend_fits_model, check_model_features

VOCAB, LATENT = 128, 32 + 16
COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=3,
    n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
    v_head_dim=24, max_position_embeddings=128, tie_word_embeddings=False, eos_token_id=None, bos_token_id=None,
    pad_token_id=0,
)  # fmt: skip
YARN: dict[str, Any] = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32, rope_theta=10000.0,
                            beta_fast=32, beta_slow=1)  # fmt: skip
V2 = dict(COMMON, q_lora_rank=None, topk_method="group_limited_greedy", routed_scaling_factor=1.5,
          norm_topk_prob=False, rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=1.0))  # fmt: skip
V3 = dict(COMMON, q_lora_rank=24, routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True,
          num_nextn_predict_layers=1, rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=1.0))  # fmt: skip
MTP_PREFIX = "model.layers.3."


def _save(hf: Any, path: Path, mtp: bool) -> None:
    """save_pretrained; with `mtp`, an MTP layer as V3's files hold it (a decoder layer past the last one)."""
    hf.save_pretrained(path, safe_serialization=True)
    if mtp:
        file = path / "model.safetensors"
        tensors = load_file(file)
        extra = {MTP_PREFIX + k.removeprefix("model.layers.2."): v.clone()
                 for k, v in tensors.items() if k.startswith("model.layers.2.")}  # fmt: skip
        extra[MTP_PREFIX + "eh_proj.weight"] = torch.randn(64, 128)
        save_file({**tensors, **extra}, file, metadata={"format": "pt"})


def tiny_hf(kind: str, std: float = 0.15, **overrides: Any) -> Any:
    """The random HF model of V2 or V3 (module docstring), config fields replaced by `overrides`, its weights
    perturbed by `std`."""
    torch.manual_seed(0)
    if kind == "v2":
        hf = tf.DeepseekV2ForCausalLM(tf.DeepseekV2Config(**{**V2, **overrides})).eval()
    else:
        hf = tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(**{**V3, **overrides})).eval()
    perturb_(hf, seed=1, std=std)
    if kind == "v3":
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            # a buffer, which perturb_ leaves at HF's zeros
            for layer in hf.model.layers[1:]:
                bias = layer.mlp.gate.e_score_correction_bias
                bias.copy_(torch.randn(bias.shape[0], generator=gen) * 0.2)
    return hf


def _tiny(kind: str, path: Path) -> tuple[Any, Path]:
    hf = tiny_hf(kind)
    _save(hf, path, mtp=kind == "v3")
    return hf, path


@pytest.fixture(scope="module", params=["v2", "v3"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    return _tiny(request.param, tmp_path_factory.mktemp(f"deepseek_{request.param}"))


def test_v2_routing_matches_hf_router() -> None:
    """greedy and group_limited_greedy: our router's experts and weights are HF's (softmax, never renormalized)."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    picks = {}
    for method in ("greedy", "group_limited_greedy"):
        config = tf.DeepseekV2Config(**dict(V2, topk_method=method))
        torch.manual_seed(5)
        hf_router = DeepseekV2TopkRouter(config)
        torch.nn.init.normal_(hf_router.weight, std=0.3)
        block = DeepseekMoeBlock(config, v2_routing(config))
        with torch.no_grad():
            block.gate.weight.copy_(hf_router.weight)
            _, hf_weights, hf_ids = hf_router(x)
            weights, ids = block.experts.router.select(block.gate(x))
        order, hf_order = ids.argsort(dim=1), hf_ids.argsort(dim=1)
        assert torch.equal(ids.long().gather(1, order), hf_ids.gather(1, hf_order)), method
        torch.testing.assert_close(
            weights.gather(1, order), hf_weights.gather(1, hf_order), rtol=0, atol=1e-6
        )
        picks[method] = ids.sort(dim=1).values
    # the premise: the groups matter
    assert not torch.equal(picks["greedy"], picks["group_limited_greedy"])


def test_mixed_batch_logits_match_hf(tiny: tuple[Any, Path]) -> None:
    check_mixed_batch(*tiny, vocab_size=VOCAB)


def test_greedy_continuations_match_hf_generate(tiny: tuple[Any, Path]) -> None:
    """model_parity's check_greedy (three prompts prefilled in 16-token chunks), 16 tokens each to keep it short."""
    hf, path = tiny
    check_greedy_runner(make_runner(path, max_num_batched_tokens=16), hf, VOCAB, max_tokens=16)


def test_latent_cache_is_one_vector_a_token(tmp_path: Path) -> None:
    """Each MLA layer caches latent + rope dims once a token: the runner's tensors are stride-0 views of one storage,
    and bytes_per_block (so the capacity in tokens) counts 48 values a token a layer, not 96."""
    _, path = _tiny("v2", tmp_path)
    runner = make_runner(path, block_size=4, num_blocks=10)
    layers = runner.kv_layers()
    assert [(a.num_kv_heads, a.head_size, a.shares_kv) for a in layers] == [(1, LATENT, True)] * 3
    for cache in runner.kv_caches:
        assert cache.shape == (2, 10, 4, 1, LATENT) and cache.stride(0) == 0
        assert cache.untyped_storage().nbytes() == 10 * 4 * LATENT * 4
        assert cache[0].data_ptr() == cache[1].data_ptr()
    assert runner.kv_cache_config is not None
    assert runner.kv_cache_config.bytes_per_block == 3 * 4 * LATENT * 4
    assert bytes_per_block(layers, 4, torch.float32, runner.attn_backend) == 3 * 4 * LATENT * 4


def test_malformed_kv_b_proj_and_mtp_layer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, path = _tiny("v3", tmp_path)
    config = tf.DeepseekV3Config.from_pretrained(path)
    assert get_model_class(config) is DeepseekV3ForCausalLM
    with caplog.at_level(logging.INFO, logger="treadle_model_runner.models"):  # glm4_moe.py logs it
        model = DeepseekV3ForCausalLM(config)
        with torch.no_grad():
            model.load_weights(iterate_weights(path, "safetensors"))
    assert len(model.model.layers) == 3 and any(
        "multi-token-prediction layers 3-3" in m for m in caplog.messages
    )
    bad = "model.layers.1.self_attn.kv_b_proj.weight"
    weights = [(n, t[:, :-1] if n == bad else t) for n, t in iterate_weights(path, "safetensors")]
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match=rf"{bad.replace('.', '[.]')}.*\(160, 31\).*\(160, 32\)"),
    ):
        DeepseekV3ForCausalLM(config).load_weights(weights)


def test_unsupported_backend_lora_and_4bit_weights_are_refused() -> None:
    class FlashInferLike:
        name = "flashinfer"

    with pytest.raises(
        ValueError, match=r"'flashinfer' cannot run multi-head latent attention.*triton.*torch"
    ):
        check_backend_fits_model(FlashInferLike, DeepseekV2ForCausalLM)
    with pytest.raises(ValueError, match=r"DeepseekV3ForCausalLM does not support w4a16 weights.*runs fp8"):
        check_model_features(DeepseekV3ForCausalLM, "w4a16", lora=False)
    check_model_features(DeepseekV3ForCausalLM, "fp8", lora=False)
    with pytest.raises(ValueError, match="DeepseekV2ForCausalLM does not support LoRA"):
        check_model_features(DeepseekV2ForCausalLM, None, lora=True)


TRITON_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from test_runner_fakes import FakeScheduler, make_runner, record_hidden

    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 128, (n,), generator=gen).tolist() for n in (9, 3)]
    results = {}
    for backend in ("torch", "triton"):
        runner = make_runner(sys.argv[1], attention_backend=backend, block_size=4, kv_cache_dtype=sys.argv[2])
        hidden = record_hidden(runner)
        sched = FakeScheduler(runner, seed=1)
        for i, p in enumerate(prompts):
            sched.add(f"r{i}", p, max_tokens=2 + i)
        results[backend] = (sched.run(budget=8), hidden)
    (ref_tokens, ref_hidden), (tokens, hidden) = results["torch"], results["triton"]
    assert tokens == ref_tokens, (tokens, ref_tokens)
    for step, (h, r) in enumerate(zip(hidden, ref_hidden, strict=True)):
        torch.testing.assert_close(h, r, atol=1e-4, rtol=1e-4, msg=lambda m, s=step: f"step {s}: {m}")
    print("steps", len(hidden), "tokens", tokens)
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test covers the real kernels")
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_triton_interpreter_matches_torch_backend(tmp_path: Path, kv_cache_dtype: str) -> None:
    """Chunked prefills and decodes over the shared latent cache: the unified Triton kernel (head size 48, padded to
    64) reads K and V through the stride-0 view as the torch backend does, from the model-dtype cache and from an
    e4m3 one (--kv-cache-dtype fp8: one latent of e4m3 values a token)."""
    pytest.importorskip("triton")
    _, path = _tiny("v3", tmp_path)
    assert "steps" in run_interpreted(TRITON_SCRIPT, str(path), kv_cache_dtype)
