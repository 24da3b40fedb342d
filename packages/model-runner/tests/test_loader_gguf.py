"""GGUF -> HF conversion on tiny GGUF files written inside the test with gguf.GGUFWriter.

The references are independent of the converter: block dequantization is re-implemented here from the
format's definition (Q8_0: fp16 scale + 32 int8; Q4_1: fp16 scale, fp16 min, 32 nibbles low-half first),
and llama.cpp's q/k row permutation is applied forward (as llama.cpp's converter does) to known HF weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from treadle_model_runner.loader import convert_gguf, iterate_weights
from treadle_model_runner.loader.gguf_tokenizer import build_tokenizer
from treadle_model_runner.loader.gguf_weights import open_gguf

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


def write_tiny_gguf(
    path: Path, *, tied: bool = True, seed: int = 0, arch: str = "llama"
) -> dict[str, torch.Tensor]:
    """Write a 2-layer Llama GGUF; return the HF-named tensors the converter must produce."""
    gen = torch.Generator().manual_seed(seed)
    tokens = vocab_tokens()
    vocab = len(tokens)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (vocab - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
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
        add(
            p + "attn_q.weight",
            h + "self_attn.q_proj.weight",
            rand(HEADS * HEAD_DIM, HIDDEN),
            qkv_type,
            HEADS,
        )
        add(
            p + "attn_k.weight",
            h + "self_attn.k_proj.weight",
            rand(KV_HEADS * HEAD_DIM, HIDDEN),
            qkv_type,
            KV_HEADS,
        )
        add(p + "attn_v.weight", h + "self_attn.v_proj.weight", rand(KV_HEADS * HEAD_DIM, HIDDEN), Q.Q8_0)
        add(p + "attn_output.weight", h + "self_attn.o_proj.weight", rand(HIDDEN, HIDDEN), Q.Q4_1)
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


def test_tokenizer_from_gguf_metadata(tiny_gguf: tuple[Path, dict], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path, _ = tiny_gguf
    tokens = vocab_tokens()
    tokenizer = build_tokenizer(open_gguf(path))
    ids = tokenizer.encode("hello world 12<|im_end|>").ids
    # merges give "hello", "Ġwor"; digits split one by one; the control token matches whole
    assert [tokens[i] for i in ids] == ["hello", "Ġwor", "l", "d", "Ġ", "1", "2", "<|im_end|>"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello world 12"
    out = tmp_path / "hf"
    out.mkdir()
    convert_gguf(path, out)
    hf_tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf_tokenizer.eos_token == "<|im_end|>" and hf_tokenizer.bos_token == "<|im_start|>"
    assert hf_tokenizer.unk_token == "<|endoftext|>" and hf_tokenizer.pad_token == "<|im_end|>"
    assert hf_tokenizer("hello").input_ids == [tokens.index("hello")]  # no BOS: add_bos_token false
    text = hf_tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    assert text == "<|im_start|>user\nhello<|im_end|>\n"


def test_unsupported_gguf_architecture_is_named(tmp_path: Path) -> None:
    path = tmp_path / "other.gguf"
    write_tiny_gguf(path, arch="bert")
    with pytest.raises(ValueError, match=r"other\.gguf.*architecture 'bert'.*llama"):
        list(iterate_weights(path))


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00garbage", b"not a gguf file at all"])
def test_corrupt_gguf_is_named(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"broken\.gguf is corrupt, truncated or not a GGUF file"):
        list(iterate_weights(path, "gguf"))


def test_truncated_gguf_is_named(tiny_gguf: tuple[Path, dict], tmp_path: Path) -> None:
    path, _ = tiny_gguf
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.gguf is corrupt, truncated"):
        list(iterate_weights(cut))


def test_missing_gguf_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"GGUF file .*absent\.gguf does not exist"):
        list(iterate_weights(tmp_path / "absent.gguf"))


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
