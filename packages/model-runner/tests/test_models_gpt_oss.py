"""gpt-oss (`GptOssForCausalLM`) against HF transformers on a tiny random config (CPU, fp32).

The config keeps every part of the family: 4 layers alternating a 6-token sliding window (shorter than the test's
prompts) and full attention, 4 query heads over 2 key/value heads of 16 dims, q/k/v/o biases, the released YaRN rope
(factor 32 over 4096, theta 150000, truncate false), 8 experts top 2 with biases and the clamped SwiGLU. Every weight
is perturbed off HF's init (the biases HF zeroes included), the sinks are drawn at the attention logits' scale, and
the experts' gate_up weights are scaled so that their pre-activations pass the +-7 clamp.
- The premise: the sinks, the window and the clamp each change HF's logits.
- Parity (model_parity): a mixed step's per-position logits within 1e-4 of HF, greedy continuations equal to HF's.
- Loading: the registry, each layer's window and sinks; a missing sink or expert bias is named as the files spell it.
- Two ranks (gloo) under tensor parallelism and under expert parallelism give the one-rank tokens and logprobs.
- Dummy weights (load_format='dummy') build and run the family, with the released mxfp4 quantization_config too.
- On CUDA (marked gpu): head_dim 64 on the Triton backend, eagerly and with CUDA graphs, against HF in fp32.
The released MXFP4 checkpoints' layout is test_models_gpt_oss_mxfp4.py's.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from model_parity import check_greedy, check_mixed_batch, hf_logits
from test_quantization_fp8_parallel import check_same_greedy, greedy_with_logprobs
from test_runner_fakes import FakeScheduler, make_runner, perturb_
from test_runner_parallel import two_rank_results

from treadle_model_runner.loader import iterate_weights, make_dummy_model_dir
from treadle_model_runner.models import get_model_class
from treadle_model_runner.models.gpt_oss import GptOssForCausalLM
from treadle_model_runner.parallel import destroy_tensor_parallel, init_tensor_parallel

VOCAB = 128
CONFIG: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=6,
    tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=0,
)  # fmt: skip
# the released checkpoints' quantization_config (their config.json)
MXFP4_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"
    ],
}  # fmt: skip
WINDOWS = [6, None, 6, None]


def tiny_hf(**fields: Any) -> Any:
    """The tiny HF model (module docstring); `fields` override CONFIG's."""
    config = tf.GptOssConfig(**{**CONFIG, **fields})
    config._attn_implementation = "eager"
    assert config.layer_types == ["sliding_attention", "full_attention"] * 2
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["factor"] == 32.0
    torch.manual_seed(0)
    hf = tf.GptOssForCausalLM(config).eval()
    perturb_(hf, seed=1, std=0.15)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.sinks.copy_(torch.randn(config.num_attention_heads, generator=gen))
            layer.mlp.experts.gate_up_proj.mul_(4.0)
    return hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    hf = tiny_hf()
    path = tmp_path_factory.mktemp("gpt_oss")
    hf.save_pretrained(path, safe_serialization=True)
    return hf, path


@pytest.fixture(scope="module")
def tiny_head64(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    hf = tiny_hf(head_dim=64)
    path = tmp_path_factory.mktemp("gpt_oss_head64")
    hf.save_pretrained(path, safe_serialization=True)
    return hf, path


def _loaded(path: Path) -> GptOssForCausalLM:
    model = GptOssForCausalLM(tf.GptOssConfig.from_pretrained(path))
    with torch.no_grad():
        model.load_weights(iterate_weights(path, "safetensors"))
    return model


def _differs(hf: Any, tokens: list[int], change: Any, undo: Any) -> float:
    """How far HF's logits move (max abs) when `change()` is applied (undone after)."""
    before = hf_logits(hf, tokens)
    change()
    try:
        return float((hf_logits(hf, tokens) - before).abs().max())
    finally:
        undo()


def test_sinks_window_and_clamp_each_matter(tiny: tuple[Any, Path]) -> None:
    hf, _ = tiny
    tokens = torch.randint(1, VOCAB, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    layers = hf.model.layers
    sinks = [layer.self_attn.sinks.detach().clone() for layer in layers]

    def set_sinks(values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for layer, value in zip(layers, values, strict=True):
                layer.self_attn.sinks.copy_(value)

    no_sinks = [torch.full_like(s, -1e4) for s in sinks]
    assert _differs(hf, tokens, lambda: set_sinks(no_sinks), lambda: set_sinks(sinks)) > 1e-2
    window = hf.config.sliding_window
    assert _differs(hf, tokens, lambda: setattr(hf.config, "sliding_window", 64),
                    lambda: setattr(hf.config, "sliding_window", window)) > 1e-2  # fmt: skip
    experts = [layer.mlp.experts for layer in layers]
    assert _differs(hf, tokens, lambda: [setattr(e, "limit", 1e9) for e in experts],
                    lambda: [setattr(e, "limit", 7.0) for e in experts]) > 1e-2  # fmt: skip


def test_mixed_batch_logits_match_hf(tiny: tuple[Any, Path]) -> None:
    check_mixed_batch(*tiny, vocab_size=VOCAB)


def test_greedy_continuations_match_hf_generate(tiny: tuple[Any, Path]) -> None:
    check_greedy(*tiny, vocab_size=VOCAB)


def test_layers_windows_sinks_and_biases(tiny: tuple[Any, Path]) -> None:
    _, path = tiny
    model = _loaded(path)
    assert get_model_class(model.config) is GptOssForCausalLM
    assert get_model_class(tf.GptOssConfig(**CONFIG)) is GptOssForCausalLM  # by model_type
    attns = [layer.self_attn for layer in model.model.layers]
    assert [a.attn.sliding_window for a in attns] == WINDOWS
    for a in attns:  # the impl is handed the model's own parameter, loaded in place
        assert a.sinks is not None and a.attn.sinks is a.sinks and a.sinks.shape == (4,)
        assert a.qkv_proj.bias is not None and a.o_proj.bias is not None
    experts = model.model.layers[0].mlp.experts
    assert experts.activation == "swigluoai" and experts.w13_bias is not None and experts.w2_bias is not None


@pytest.mark.parametrize("dropped", ["model.layers.1.self_attn.sinks", "model.layers.2.mlp.experts.down_proj_bias",
                                     "model.layers.0.mlp.experts.gate_up_proj_bias"])  # fmt: skip
def test_missing_sinks_or_expert_bias_is_named(tiny: tuple[Any, Path], dropped: str) -> None:
    _, path = tiny
    weights = [(n, t) for n, t in iterate_weights(path, "safetensors") if n != dropped]
    model = GptOssForCausalLM(tf.GptOssConfig.from_pretrained(path))
    with torch.no_grad(), pytest.raises(ValueError, match=dropped.replace(".", r"\.")):
        model.load_weights(weights)


def test_a_backend_without_sinks_is_refused_before_loading(
    tiny: tuple[Any, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--attention-backend flashinfer on gpt-oss: refused as the runner picks the backend, before any weight is read
    (the layer's own refusal comes only when the backend is bound, after loading)."""
    from treadle_kernels.attention.flashinfer_backend import FlashInferAttentionBackend
    from treadle_model_runner.runner import model_runner

    monkeypatch.setattr(model_runner, "get_attn_backend", lambda name, device: FlashInferAttentionBackend)
    monkeypatch.setattr(model_runner, "build_causal_lm", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ValueError, match=r"GptOssForCausalLM has attention sinks.*'flashinfer'.*triton"):
        make_runner(tiny[1])


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
    """Heads and their sinks split; the experts' columns and gate / up biases (tp) or whole experts (ep) split, the
    down bias added once; the router replicated."""
    _, path = tiny
    by_rank = two_rank_results(_rank_main, path)
    expected = greedy_with_logprobs(make_runner(path))
    for rank, got in by_rank.items():
        for mode in ("tp", "ep"):
            check_same_greedy(got[mode], expected, (mode, rank))


@pytest.mark.parametrize("quantization_config", [None, MXFP4_CONFIG], ids=["bf16", "mxfp4"])
def test_dummy_weights_generate(tmp_path: Path, quantization_config: dict[str, Any] | None) -> None:
    config = tf.GptOssConfig(**CONFIG).to_dict()
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    runner = make_runner(make_dummy_model_dir(config, tmp_path), load_format="dummy")
    layer = runner._require_model().model.layers[0]  # type: ignore[union-attr]
    assert 0.01 < float(layer.mlp.experts.w13_weight.std()) < 0.04
    assert layer.self_attn.sinks is not None and float(layer.self_attn.sinks.abs().max()) > 0
    sched = FakeScheduler(runner, seed=1)
    sched.add("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], max_tokens=8)
    assert len(sched.run(budget=16)["a"]) == 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("backend", "eager"), [("torch", True), ("triton", True), ("triton", False)],
                         ids=["torch", "triton", "graphs"])  # fmt: skip
def test_gpu_fp32_matches_hf(tiny_head64: tuple[Any, Path], backend: str, eager: bool) -> None:
    """head_dim 64 (the real models'): the sinks and the window in the Triton kernels, the biased clamped-SwiGLU
    experts on the Triton fused-MoE kernel (fp32); a mixed step within 2e-3 of HF (CPU) and greedy continuations
    equal, eagerly and with CUDA graphs."""
    hf, path = tiny_head64
    runner = dict(device="cuda", attention_backend=backend, enforce_eager=eager, block_size=16, num_blocks=64,
                  max_model_len=128)  # fmt: skip
    check_mixed_batch(hf, path, VOCAB, atol=2e-3, **runner)
    check_greedy(hf, path, VOCAB, **runner)
    torch.cuda.empty_cache()
