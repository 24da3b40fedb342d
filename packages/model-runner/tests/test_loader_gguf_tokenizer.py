"""The byte-level BPE tokenizer rebuilt from GGUF metadata, on tiny GGUF files written by test_loader_gguf.

The split regexes are checked against llama.cpp's own (llama-vocab.cpp: its adaptations of the models' regexes,
applied one after the other, each cutting every piece into its matches and the text between them), run by the
`regex` package on random text.
"""

from __future__ import annotations

import random
from pathlib import Path

import gguf
import pytest
import regex
from test_loader_gguf import add_tokenizer, tiny_gguf, vocab_tokens, write_tiny_gguf

from treadle_model_runner.loader import convert_gguf
from treadle_model_runner.loader.gguf_pretokenizers import byte_level_pre_tokenizer
from treadle_model_runner.loader.gguf_tokenizer import build_tokenizer, tokenizer_config
from treadle_model_runner.loader.gguf_weights import open_gguf

__all__ = ["tiny_gguf"]  # the fixture, re-exported so pytest finds it here


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


@pytest.mark.parametrize("pre", ["gpt2", "qwen2", "llama-bpe", "olmo", "dbrx", "gpt-4o", "refact"])
def test_other_pre_tokenizers_build(tmp_path: Path, pre: str) -> None:
    path = tmp_path / "t.gguf"
    write_tiny_gguf(path, pre=pre)
    tokens = vocab_tokens()
    ids = build_tokenizer(open_gguf(path)).encode("hello world<|im_end|>").ids
    assert [tokens[i] for i in ids] == ["hello", "Ġwor", "l", "d", "<|im_end|>"]


def test_unknown_pre_tokenizer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.gguf"
    write_tiny_gguf(path, pre="deepseek-coder")
    with pytest.raises(
        ValueError, match=r"t\.gguf uses the pre-tokenizer 'deepseek-coder'.*supported: smollm"
    ):
        build_tokenizer(open_gguf(path))


_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + _CONTRACTIONS + "?|"
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + _CONTRACTIONS + "?|"
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp pre-tokenizer name -> the regexes llama-vocab.cpp splits with, for the names the new families carry
LLAMA_CPP_SPLITS = {
    "olmo": [_GPT2],  # OLMo 1.x
    "refact": [r"\p{N}", _GPT2],  # Granite 3.x / 4
    "dbrx": [_LLAMA3],  # cl100k: OLMo 2, Phi-4
    "qwen2": [_QWEN2],  # Qwen2-MoE
    "gpt-4o": [_GPT4O],  # o200k: Phi-4-mini
    "llama-bpe": [_LLAMA3],
}
_PIECES = ["Hello", "hello", "HTTPServer", "camelCase", "WORLD", "it's", "I'M", "we'Ve", "they'LL", "don't", "12",
           "12345", "7", "3.14", "  ", " ", "   ", "\t", "\n", "\r\n", "\n\n", "...", "!!", "/", "a/b", "--", "(x)",
           "東京", "😀", "😀😀", "'", "''", "x_y", "$5"]  # fmt: skip


def _llama_cpp_split(regexes: list[str], text: str) -> list[str]:
    pieces = [text]
    for pattern in regexes:
        cut = []
        for piece in pieces:
            start = 0
            for match in regex.finditer(pattern, piece):
                cut += [piece[start : match.start()]] if match.start() > start else []
                cut.append(match.group())
                start = match.end()
            cut += [piece[start:]] if start < len(piece) else []
        pieces = cut
    return pieces


@pytest.mark.parametrize("pre", list(LLAMA_CPP_SPLITS))
def test_pre_tokenizers_split_as_llama_cpp(pre: str) -> None:
    rng = random.Random(0)
    pre_tokenizer = byte_level_pre_tokenizer(pre, "t.gguf")
    for _ in range(300):
        text = "".join(rng.choice(_PIECES) + rng.choice(["", " ", ""]) for _ in range(rng.randint(1, 8)))
        pieces = [text[a:b] for _, (a, b) in pre_tokenizer.pre_tokenize_str(text)]
        assert pieces == _llama_cpp_split(LLAMA_CPP_SPLITS[pre], text), text


@pytest.mark.parametrize(("pre", "adds_bos"), [("llama-bpe", True), ("qwen2", False), ("gpt-4o", False)])
def test_bos_default_when_the_file_is_silent(tmp_path: Path, pre: str, adds_bos: bool) -> None:
    """Without tokenizer.ggml.add_bos_token, llama.cpp adds BOS for Llama 3's pre-tokenizer only."""
    writer = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    add_tokenizer(writer, pre, add_bos=None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = open_gguf(tmp_path / "t.gguf")
    tokens = vocab_tokens()
    ids = build_tokenizer(reader).encode("hello").ids
    assert ids == [tokens.index("<|im_start|>")] * adds_bos + [tokens.index("hello")]
    assert tokenizer_config(reader, 128)["add_bos_token"] is adds_bos
