"""The tokenizer rebuilt from GGUF metadata, on tiny GGUF files written by test_loader_gguf.write_tiny_gguf."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_loader_gguf import tiny_gguf, vocab_tokens, write_tiny_gguf

from treadle_model_runner.loader import convert_gguf
from treadle_model_runner.loader.gguf_tokenizer import build_tokenizer
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


@pytest.mark.parametrize("pre", ["gpt2", "qwen2", "llama-bpe"])
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
