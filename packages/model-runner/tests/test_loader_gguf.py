"""GGUF -> HF conversion on tiny GGUF files written inside the test with gguf.GGUFWriter.

The references are independent of the converter: block dequantization is re-implemented here from the
format's definition (Q8_0: fp16 scale + 32 int8; Q4_1: fp16 scale, fp16 min, 32 nibbles low-half first),
and llama.cpp's q/k row permutation is applied forward (as llama.cpp's converter does) to known HF weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from treadle_model_runner.loader import convert_gguf, iterate_weights

Q = gguf.GGMLQuantizationType
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 96, 2
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable unicode map, written out from its definition."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def vocab_tokens() -> list[str]:
    return SPECIALS + byte_alphabet() + [m.replace(" ", "") for m in MERGES]


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf's permute (HF rotate-half rows -> interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def ref_dequant_q8_0(raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    blocks = raw.reshape(-1, 34)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    quants = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return torch.from_numpy((scale * quants).reshape(shape))


def ref_dequant_q4_1(raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    blocks = raw.reshape(-1, 20)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    minimum = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    nibbles = blocks[:, 4:]
    quants = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32)
    return torch.from_numpy((scale * quants + minimum).reshape(shape))


def add_tokenizer(writer: Any, pre: str = "smollm", add_bos: bool | None = False) -> None:
    """The tiny byte-level BPE tokenizer (vocab_tokens(), MERGES, chat TEMPLATE) as GGUF metadata
    (`add_bos` None: no tokenizer.ggml.add_bos_token key, as in files from before the converter wrote one)."""
    tokens = vocab_tokens()
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_chat_template(TEMPLATE)


def write_tiny_gguf(
    path: Path, *, tied: bool = True, seed: int = 0, arch: str = "llama", pre: str = "smollm"
) -> dict[str, torch.Tensor]:
    """Write a 2-layer Llama (or Qwen2: q/k/v biases, Qwen3: q/k norms and head_dim != hidden/heads) GGUF;
    return the HF-named tensors the converter must produce."""
    gen = torch.Generator().manual_seed(seed)
    head_dim = 32 if arch == "qwen3" else HEAD_DIM
    permuted = arch == "llama"  # llama.cpp permutes q/k rows for Llama only
    vocab = len(vocab_tokens())
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    if arch == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    add_tokenizer(writer, pre)
    expected: dict[str, torch.Tensor] = {}

    def add(gguf_name: str, hf_name: str, w: torch.Tensor, qtype: Q, n_head: int | None = None) -> None:
        stored = llama_cpp_permute(w, n_head) if n_head else w
        if qtype == Q.F32:
            writer.add_tensor(gguf_name, stored.numpy())
            expected[hf_name] = w.clone()  # exact: no quantization, the permutation must be undone exactly
            return
        raw = gguf.quants.quantize(stored.numpy(), qtype)
        writer.add_tensor(gguf_name, raw, raw_dtype=qtype)
        ref = {Q.Q8_0: ref_dequant_q8_0, Q.Q4_1: ref_dequant_q4_1}[qtype](raw, tuple(w.shape))
        # undo the permutation through an index map, independently of the converter's reshape
        order = (
            llama_cpp_permute(torch.arange(w.shape[0], dtype=torch.float64), n_head).long()
            if n_head
            else None
        )
        expected[hf_name] = ref[torch.argsort(order)] if order is not None else ref
        assert (expected[hf_name] - w).abs().max() < 0.1 * w.abs().max(), "quantization error out of range"

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    add("token_embd.weight", "model.embed_tokens.weight", rand(vocab, HIDDEN), Q.Q8_0)
    for i in range(LAYERS):
        p, h = f"blk.{i}.", f"model.layers.{i}."
        qkv_type = Q.Q4_1 if i == 0 else Q.F32
        q_heads, kv_heads = (HEADS, KV_HEADS) if permuted else (None, None)
        add(
            p + "attn_q.weight",
            h + "self_attn.q_proj.weight",
            rand(HEADS * head_dim, HIDDEN),
            qkv_type,
            q_heads,
        )
        add(
            p + "attn_k.weight",
            h + "self_attn.k_proj.weight",
            rand(KV_HEADS * head_dim, HIDDEN),
            qkv_type,
            kv_heads,
        )
        add(p + "attn_v.weight", h + "self_attn.v_proj.weight", rand(KV_HEADS * head_dim, HIDDEN), Q.Q8_0)
        add(p + "attn_output.weight", h + "self_attn.o_proj.weight", rand(HIDDEN, HEADS * head_dim), Q.Q4_1)
        if arch == "qwen2":
            for proj, rows in (
                ("q", HEADS * head_dim),
                ("k", KV_HEADS * head_dim),
                ("v", KV_HEADS * head_dim),
            ):
                add(f"{p}attn_{proj}.bias", f"{h}self_attn.{proj}_proj.bias", rand(rows), Q.F32)
        if arch == "qwen3":
            add(p + "attn_q_norm.weight", h + "self_attn.q_norm.weight", 1 + 0.1 * rand(head_dim), Q.F32)
            add(p + "attn_k_norm.weight", h + "self_attn.k_norm.weight", 1 + 0.1 * rand(head_dim), Q.F32)
        add(p + "ffn_gate.weight", h + "mlp.gate_proj.weight", rand(FFN, HIDDEN), Q.Q4_1)
        add(p + "ffn_up.weight", h + "mlp.up_proj.weight", rand(FFN, HIDDEN), Q.Q8_0)
        add(p + "ffn_down.weight", h + "mlp.down_proj.weight", rand(HIDDEN, FFN), Q.Q4_1)
        add(p + "attn_norm.weight", h + "input_layernorm.weight", 1 + 0.1 * rand(HIDDEN), Q.F32)
        add(p + "ffn_norm.weight", h + "post_attention_layernorm.weight", 1 + 0.1 * rand(HIDDEN), Q.F32)
    add("output_norm.weight", "model.norm.weight", 1 + 0.1 * rand(HIDDEN), Q.F32)
    if not tied:
        add("output.weight", "lm_head.weight", rand(vocab, HIDDEN), Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture()
def tiny_gguf(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path / "tiny.gguf"
    return path, write_tiny_gguf(path, seed=int(torch.randint(0, 2**31, ()).item()))


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_tensors_dequantize_to_reference_values_and_hf_names(tmp_path: Path, tied: bool) -> None:
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path, tied=tied, seed=int(torch.randint(0, 2**31, ()).item()))
    got = dict(iterate_weights(path, "gguf"))
    assert set(got) == set(expected)
    for name, ref in expected.items():
        assert got[name].dtype == torch.float32 and got[name].shape == ref.shape, name
        torch.testing.assert_close(got[name], ref, rtol=0, atol=1e-6, msg=name)


def test_converted_dir_matches_gguf_and_loads_in_transformers(
    tiny_gguf: tuple[Path, dict], tmp_path: Path
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    path, expected = tiny_gguf
    out = tmp_path / "hf"
    out.mkdir()
    calls: list[tuple[int, int]] = []
    convert_gguf(path, out, dtype=torch.bfloat16, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (len(expected), len(expected))
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    got = dict(iterate_weights(out))
    assert set(got) == set(expected)
    for name, ref in expected.items():
        assert got[name].dtype == torch.bfloat16
        torch.testing.assert_close(got[name], ref.to(torch.bfloat16), rtol=0, atol=0, msg=name)
    config = AutoConfig.from_pretrained(out, local_files_only=True)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        HIDDEN,
        LAYERS,
        HEADS,
    )
    assert (config.num_key_value_heads, config.intermediate_size, config.head_dim) == (
        KV_HEADS,
        FFN,
        HEAD_DIM,
    )
    assert config.vocab_size == len(vocab_tokens()) and config.max_position_embeddings == 256
    assert config.tie_word_embeddings is True and config.rms_norm_eps == pytest.approx(1e-6)
    assert config.rope_parameters["rope_theta"] == 50000.0
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    state = model.state_dict()
    for name, ref in expected.items():
        torch.testing.assert_close(state[name], ref.to(torch.bfloat16).float(), rtol=0, atol=0, msg=name)
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])  # tied


def test_resolve_model_converts_a_gguf_file_once_into_the_cache(
    tiny_gguf: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from treadle_model_runner import ModelConfig
    from treadle_model_runner.loader import resolve_model

    monkeypatch.setenv("TREADLE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TREADLE_CONVERSION_PROGRESS", "0")
    path, expected = tiny_gguf
    for model in (str(path), str(path.parent)):  # the file, or a directory holding only it
        resolved = resolve_model(ModelConfig(model=model))
        assert resolved.format == "safetensors" and resolved.source == Path(model)
        assert resolved.path.parent == tmp_path / "cache" / "models" / "gguf"
        assert resolved.tokenizer_path == resolved.path
        assert resolved.hf_config.num_key_value_heads == KV_HEADS
        got = dict(iterate_weights(resolved.path))
        torch.testing.assert_close(got["model.embed_tokens.weight"], expected["model.embed_tokens.weight"])
    converted = [p for p in (tmp_path / "cache" / "models" / "gguf").iterdir() if not p.name.startswith(".")]
    assert converted == [resolved.path]  # converted once, then reused


def test_large_conversions_are_sharded_with_an_index(tiny_gguf: tuple[Path, dict], tmp_path: Path) -> None:
    path, expected = tiny_gguf
    out = tmp_path / "sharded"
    out.mkdir()
    convert_gguf(path, out, max_shard_bytes=64 * 1024)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected) and set(index["weight_map"].values()) == set(shards)
    got = dict(iterate_weights(out))
    for name, ref in expected.items():
        torch.testing.assert_close(got[name], ref, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_each_gguf_architecture_converts_to_a_complete_hf_model(tmp_path: Path, arch: str) -> None:
    from transformers import AutoModelForCausalLM

    path = tmp_path / f"{arch}.gguf"
    expected = write_tiny_gguf(
        path, tied=arch != "qwen2", arch=arch, seed=int(torch.randint(0, 2**31, ()).item())
    )
    out = tmp_path / "hf"
    out.mkdir()
    convert_gguf(path, out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch and config["head_dim"] == (32 if arch == "qwen3" else HEAD_DIM)
    loaded: Any = AutoModelForCausalLM.from_pretrained(
        out, local_files_only=True, dtype=torch.float32, output_loading_info=True
    )
    model, info = loaded
    assert type(model).__name__ == config["architectures"][0]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    state = model.state_dict()
    for name, ref in expected.items():
        torch.testing.assert_close(state[name], ref, rtol=0, atol=1e-6, msg=name)
