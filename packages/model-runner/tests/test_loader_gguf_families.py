"""GGUF files of the families treadle runs from HF directories: Gemma 3, Gemma 2, Phi-3 (and Phi-4-mini's partial
rotary), Qwen2-MoE, OLMo 2, Granite and SmolLM3, each a tiny random HF model written as llama.cpp's converter writes it
(gguf_llama_cpp.py, independent of treadle's reader), converted by treadle and compared with the original model:

- the converted directory loads in transformers with every weight and gives the original's logits;
- treadle's runner, given the .gguf file, gives per-position logits within 1e-4 of the original (HF, fp32) in a
  step mixing prefills and decodes, and the same greedy 16-token continuations.

The HF configs hold only what a GGUF file can carry (a Gemma's query_pre_attn_scalar is its head_dim, as
llama.cpp derives it; Gemma 3 has six layers so that llama.cpp's fixed pattern makes the last one global).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import transformers as tf
from gguf_llama_cpp import write_llama_cpp_gguf
from model_parity import check_greedy_runner, check_mixed_batch, hf_logits
from test_loader_gguf import vocab_tokens
from test_runner_fakes import make_runner, perturb_

from treadle_model_runner.loader import convert_gguf, iterate_weights
from treadle_model_runner.loader.gguf_config import hf_config_dict
from treadle_model_runner.loader.gguf_weights import count_gguf_tensors, open_gguf

VOCAB = len(vocab_tokens())
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=2)  # fmt: skip


def _phi3(partial: float, original: int) -> Any:
    pairs = int(16 * partial) // 2
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": partial,
            "short_factor": [1.0 + 0.3 * i for i in range(pairs)], "long_factor": [1.5 + 2.0 * i for i in range(pairs)]}  # fmt: skip
    window = 7 if partial == 1.0 else None
    return tf.Phi3Config(**COMMON, original_max_position_embeddings=original, sliding_window=window,
                         rope_parameters=rope, tie_word_embeddings=partial != 1.0)  # fmt: skip


def _hf_config(family: str) -> tuple[str, Any]:
    """(llama.cpp architecture, HF config) of one family's tiny model."""
    if (
        family == "gemma3"
    ):  # 6 layers: 5 sliding, the 6th global (llama.cpp's fixed pattern); head_dim != 64/4
        rope = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}  # fmt: skip
        config = tf.Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 6}, head_dim=32, query_pre_attn_scalar=32,
                                     sliding_window=6, final_logit_softcapping=20.0, rope_parameters=rope)  # fmt: skip
        assert config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
        return "gemma3", config
    if family == "gemma2":
        return "gemma2", tf.Gemma2Config(**COMMON, head_dim=32, query_pre_attn_scalar=32, sliding_window=6,
                                         attn_logit_softcapping=3.0, final_logit_softcapping=20.0)  # fmt: skip
    if family == "phi3":  # longrope on its short factors (max_model_len 64), a sliding window
        return "phi3", _phi3(1.0, 64)
    if family == "phi4_mini":  # partial rotary (12 of 16 dims), longrope on its long factors, tied
        return "phi3", _phi3(0.75, 2)
    if family == "qwen2moe":
        return "qwen2moe", tf.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                             shared_expert_intermediate_size=48, tie_word_embeddings=False)  # fmt: skip
    if family == "olmo2":
        return "olmo2", tf.Olmo2Config(**COMMON)
    if family == "granite":  # q/k permuted like llama; every multiplier away from 1
        return "granite", tf.GraniteConfig(**COMMON, embedding_multiplier=3.0, residual_multiplier=0.4,
                                           attention_multiplier=0.11, logits_scaling=2.5, tie_word_embeddings=True)  # fmt: skip
    if family == "smollm3":  # q/k permuted like llama; layer 3 NoPE (llama.cpp's fixed step of 4), tied
        return "smollm3", tf.SmolLM3Config(**{**COMMON, "num_hidden_layers": 4}, tie_word_embeddings=True)
    raise AssertionError(family)


FAMILIES = ["gemma3", "gemma2", "phi3", "phi4_mini", "qwen2moe", "olmo2", "granite", "smollm3"]
RUNNER_KWARGS: dict[str, dict[str, Any]] = {"phi3": {"max_model_len": 64}}


def _hf_model(family: str) -> tuple[str, Any]:
    arch, config = _hf_config(family)
    torch.manual_seed(FAMILIES.index(family))
    hf = tf.AutoModelForCausalLM.from_config(config).eval()
    perturb_(hf, seed=1, std=0.15)
    return arch, hf


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TREADLE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TREADLE_CONVERSION_PROGRESS", "0")


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_gguf_runs_as_the_original_model(family: str, tmp_path: Path) -> None:
    arch, hf = _hf_model(family)
    path = tmp_path / f"{family}.gguf"
    write_llama_cpp_gguf(path, arch, hf)
    out = tmp_path / "hf"
    out.mkdir()
    convert_gguf(path, out)
    assert json.loads((out / "config.json").read_text())["architectures"] == [type(hf).__name__]
    loaded: Any = tf.AutoModelForCausalLM.from_pretrained(
        out, local_files_only=True, dtype=torch.float32, output_loading_info=True
    )
    model, info = loaded
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    tokens = torch.randint(3, VOCAB, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    torch.testing.assert_close(hf_logits(model.eval(), tokens), hf_logits(hf, tokens), rtol=0, atol=1e-5)

    kwargs = RUNNER_KWARGS.get(family, {})
    check_mixed_batch(hf, path, VOCAB, **kwargs)
    runner = make_runner(path, max_num_batched_tokens=16, **kwargs)
    check_greedy_runner(runner, hf, VOCAB, max_tokens=16)


def test_quantized_gguf_runs_as_its_dequantized_weights(tmp_path: Path) -> None:
    """Gemma 3 with every projection and the embeddings in Q8_0: treadle's logits are those of the original
    model holding the dequantized weights (the block format decoded in the test), not of the original."""
    arch, hf = _hf_model("gemma3")
    quantize = frozenset(n for n, p in hf.named_parameters() if p.dim() == 2)
    path = tmp_path / "gemma3-q8_0.gguf"
    recovered = write_llama_cpp_gguf(path, arch, hf, quantize)
    assert set(recovered) == quantize and len(quantize) == 1 + 6 * 7
    reference = tf.AutoModelForCausalLM.from_config(hf.config).eval()
    reference.load_state_dict(
        {**hf.state_dict(), **recovered, "lm_head.weight": recovered["model.embed_tokens.weight"]}
    )
    tokens = list(range(3, 23))
    assert (hf_logits(reference, tokens) - hf_logits(hf, tokens)).abs().max() > 1e-3  # quantization shows
    check_mixed_batch(reference, path, VOCAB)


def test_phi3_q_k_v_as_three_tensors_stack_back_into_qkv_proj(tmp_path: Path) -> None:
    """llama.cpp's loader also takes a Phi-3 file whose q, k, v are separate tensors: same HF tensors."""
    arch, hf = _hf_model("phi3")
    fused, split = tmp_path / "fused.gguf", tmp_path / "split.gguf"
    write_llama_cpp_gguf(fused, arch, hf)
    write_llama_cpp_gguf(split, arch, hf, split_qkv=True)
    assert "blk.0.attn_q.weight" in {t.name for t in open_gguf(split).tensors}
    want, got = dict(iterate_weights(fused, "gguf")), dict(iterate_weights(split, "gguf"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert count_gguf_tensors(open_gguf(split)) == len(got)


def _metadata_only(
    path: Path, arch: str, layers: int, hidden: int, heads: int, head_dim: int
) -> dict[str, Any]:
    """hf_config_dict of a file holding only these hyperparameters (and a sliding window)."""
    _write_metadata(path, arch, layers, hidden, heads, head_dim)
    return hf_config_dict(open_gguf(path), torch.bfloat16)


def _write_metadata(
    path: Path, arch: str, layers: int, hidden: int, heads: int, head_dim: int, tokenizer_model: str = "llama"
) -> None:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(layers)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(4 * hidden)
    writer.add_head_count(heads)
    writer.add_key_length(head_dim)
    writer.add_sliding_window(512)
    writer.add_tokenizer_model(tokenizer_model)  # "llama": SentencePiece, as Gemma's files have it
    writer.add_token_list(["<unk>", "<s>", "</s>"])
    writer.add_tensor("token_embd.weight", np.zeros((3, hidden), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    ("arch", "layers", "scalar"),
    [("gemma3", 62, 168), ("gemma3", 26, 128), ("gemma2", 46, 168), ("gemma2", 42, 128)],
)
def test_gemma_attention_scale_follows_llama_cpp(tmp_path: Path, arch: str, layers: int, scalar: int) -> None:
    """llama.cpp scales a Gemma's attention by 1/sqrt(hidden / heads) for the 27B (62 layers for Gemma 3, 46 for
    Gemma 2), by 1/sqrt(head_dim) otherwise; the file does not say."""
    config = _metadata_only(tmp_path / "g.gguf", arch, layers, hidden=5376, heads=32, head_dim=128)
    assert config["query_pre_attn_scalar"] == scalar
    if arch == "gemma3":  # every 6th layer global, the sliding ones on rope base 10000 when the file has none
        assert config["layer_types"][:6] == ["sliding_attention"] * 5 + ["full_attention"]
        assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0


def test_unknown_architecture_lists_the_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "other.gguf"
    with pytest.raises(ValueError, match=r"architecture 'falcon'.*gemma2, gemma3, phi3, olmo2, granite"):
        _metadata_only(path, "falcon", 2, 64, 4, 16)


def test_unrebuildable_tokenizer_is_refused_before_its_weights_are_read(tmp_path: Path) -> None:
    """SentencePiece BPE ('llama') files convert now (test_loader_gguf_sentencepiece.py); unigram ('t5') ones
    are still refused, and before any weight is written."""
    path, out = tmp_path / "spm.gguf", tmp_path / "hf"
    _write_metadata(path, "gemma3", 2, 64, 4, 16, tokenizer_model="t5")
    out.mkdir()
    with pytest.raises(
        ValueError,
        match=r"spm\.gguf has tokenizer model 't5' \(SentencePiece unigram.*treadle rebuilds only byte-level",
    ):
        convert_gguf(path, out)
    assert list(out.iterdir()) == []
