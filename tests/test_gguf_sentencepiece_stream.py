"""A SentencePiece GGUF tokenizer through the frontend: the directory the model-runner's converter writes, loaded by
treadle_frontend.tokenizer.load_tokenizer, and its ids streamed by the incremental detokenizer one token at a time.

The reference is the sentencepiece package (a tiny model trained on the spot, packages/model-runner/tests/
gguf_sentencepiece.py): the streamed text of an output is SentencePiece's decode of prompt + output minus its
decode of the prompt (the output's leading space is real text after a prompt, dropped at the very start).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "packages" / "model-runner" / "tests"))

from gguf_sentencepiece import GEMMA, LLAMA, Flavor, random_texts, train_sentencepiece, write_tokenizer_gguf

from treadle_frontend.detokenizer import IncrementalDetokenizer, TokenDecoder
from treadle_frontend.tokenizer import load_tokenizer
from treadle_model_runner.loader.gguf_tokenizer import write_tokenizer_files
from treadle_model_runner.loader.gguf_weights import open_gguf


def _stream(tokenizer: Any, prompt: list[int], ids: list[int]) -> list[str]:
    detokenizer = IncrementalDetokenizer(TokenDecoder(tokenizer), prompt, skip_special_tokens=True)
    return [detokenizer.update([token]) for token in ids] + [detokenizer.flush()]


@pytest.mark.parametrize("flavor", [LLAMA, GEMMA], ids=lambda f: f.name)
def test_streamed_text_is_sentencepiece_decode(flavor: Flavor, tmp_path: Path) -> None:
    sp = train_sentencepiece(flavor)
    write_tokenizer_gguf(tmp_path / "t.gguf", sp, flavor)
    write_tokenizer_files(open_gguf(tmp_path / "t.gguf"), tmp_path, model_max_length=128)
    tokenizer = load_tokenizer(tmp_path)
    for prompt_text in ["", "Q: hello", "東京"]:
        prompt = sp.encode(prompt_text)
        for text in random_texts(flavor, 120, seed=5):
            # outputs without the control symbols, which SentencePiece decodes as text and treadle skips
            ids = [i for i in tokenizer.encode(text, add_special_tokens=False) if not sp.is_control(i)]
            ids = [i for i in ids if sp.id_to_piece(i) not in flavor.special_symbols]
            deltas = _stream(tokenizer, prompt, ids)
            expected = sp.decode(prompt + ids)[len(sp.decode(prompt)) :]
            assert "".join(deltas) == expected, (prompt_text, text)
            assert all("\ufffd" not in d for d in deltas), (text, deltas)
    # a skipped control token inside the output keeps the next token's space
    ids = [*sp.encode("hello"), sp.eos_id(), *sp.encode("world")]
    assert "".join(_stream(tokenizer, [], ids)) == sp.decode(ids)
