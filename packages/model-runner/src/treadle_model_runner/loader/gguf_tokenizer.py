"""A GGUF file's tokenizer metadata as HF ``tokenizer.json`` + ``tokenizer_config.json``.

Theory: llama.cpp's converter writes one of two tokenizer models treadle rebuilds (``tokenizer.ggml.model``):

- ``gpt2``, byte-level BPE: the vocabulary already in the byte-level alphabet (``tokenizer.ggml.tokens``,
  id = position), the merges (``"a b"`` strings, rank = position) and the name of the split regex
  (``tokenizer.ggml.pre``, gguf_pretokenizers.py). Pre-tokenize (regex split, then byte-to-unicode), then BPE
  by merge rank.
- ``llama``, SentencePiece BPE: pieces and scores, no merges (gguf_sentencepiece.py).

Both carry a type per token (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte): control and
unknown tokens become special tokens (matched whole before anything else, skipped on decode with
``skip_special_tokens``), user-defined ones plain added tokens, also matched whole. BOS/EOS are added as
``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` say, with llama.cpp's defaults where the file is silent
(SentencePiece: BOS, no EOS; byte-level: neither, but BOS for Llama 3's pre-tokenizer).

Invariants: token ids equal GGUF positions; a tokenizer model treadle does not rebuild (SentencePiece unigram
``t5``, WordPiece ``bert``, ...) or an unknown pre-tokenizer raises ValueError naming the file, the value and
the supported ones, rather than tokenizing subtly wrong.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, processors

from treadle_model_runner.loader.gguf_pretokenizers import (
    ADDS_BOS_BY_DEFAULT,
    byte_level_normalizer,
    byte_level_pre_tokenizer,
)
from treadle_model_runner.loader.gguf_sentencepiece import (
    TOKEN_CONTROL,
    TOKEN_UNKNOWN,
    TOKEN_USER_DEFINED,
    build_sentencepiece_tokenizer,
)
from treadle_model_runner.loader.gguf_weights import gguf_value

logger = logging.getLogger(__name__)

SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")
_ROLE_KEYS = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}  # HF role -> GGUF key infix
# llama.cpp's special ids for a SentencePiece file that names none
_SENTENCEPIECE_DEFAULT_IDS = {"bos": 1, "eos": 2, "unknown": 0}


def _tokenizer_model(reader: Any) -> str:
    kind = str(gguf_value(reader, "tokenizer.ggml.model"))
    if kind in SUPPORTED_TOKENIZER_MODELS:
        return kind
    what = " (SentencePiece unigram, as T5's)" if kind == "t5" else ""
    raise ValueError(
        f"GGUF file {reader.data.filename} has tokenizer model {kind!r}{what}; treadle rebuilds only byte-level "
        "BPE ('gpt2') and SentencePiece BPE ('llama') tokenizers. Use the model's HF release (tokenizer.json) "
        "instead"
    )


def _token(reader: Any, role_key: str, tokens: list[str]) -> str | None:
    """The token of special role ``role_key`` (``bos``, ``eos``, ``unknown``, ``padding``), if the file has one."""
    default = _SENTENCEPIECE_DEFAULT_IDS.get(role_key) if _tokenizer_model(reader) == "llama" else None
    token_id = gguf_value(reader, f"tokenizer.ggml.{role_key}_token_id", default)
    return None if token_id is None or not 0 <= int(token_id) < len(tokens) else tokens[int(token_id)]


def _adds(reader: Any, which: str) -> bool:
    """Whether encoding adds BOS (``which`` = "bos") or EOS, with llama.cpp's default where the file is silent."""
    value = gguf_value(reader, f"tokenizer.ggml.add_{which}_token", None)
    if value is not None:
        return bool(value)
    if which == "eos":
        return False
    pre = str(gguf_value(reader, "tokenizer.ggml.pre", "default"))
    return _tokenizer_model(reader) == "llama" or pre in ADDS_BOS_BY_DEFAULT


def _byte_level_tokenizer(reader: Any, tokens: list[str], path: str) -> Tokenizer:
    merges = [tuple(m.split(" ", 1)) for m in gguf_value(reader, "tokenizer.ggml.merges")]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = str(gguf_value(reader, "tokenizer.ggml.pre", "default"))
    tokenizer.pre_tokenizer = byte_level_pre_tokenizer(pre, path)
    normalizer = byte_level_normalizer(pre)
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _post_processor(reader: Any, tokens: list[str]) -> Any | None:
    """BOS/EOS around the ids, as the file asks."""
    bos = _token(reader, "bos", tokens) if _adds(reader, "bos") else None
    eos = _token(reader, "eos", tokens) if _adds(reader, "eos") else None
    if bos is None and eos is None:
        return None
    first = [t for t in (bos,) if t] + ["$A"] + [t for t in (eos,) if t]
    second = [f"{t}:1" for t in (bos,) if t] + ["$B:1"] + [f"{t}:1" for t in (eos,) if t]
    special = {t: tokens.index(t) for t in (bos, eos) if t}
    return processors.TemplateProcessing(
        single=" ".join(first), pair=" ".join(first + second), special_tokens=list(special.items())
    )


def build_tokenizer(reader: Any) -> Tokenizer:
    """The HF fast tokenizer described by a GGUF file's ``tokenizer.ggml.*`` metadata."""
    path = str(reader.data.filename)
    kind = _tokenizer_model(reader)
    tokens: list[str] = list(gguf_value(reader, "tokenizer.ggml.tokens"))
    token_types: list[int] = list(gguf_value(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"GGUF file {path}: tokenizer.ggml.tokens holds duplicate tokens")
    if kind == "llama":
        tokenizer = build_sentencepiece_tokenizer(reader, tokens, token_types)
    else:
        tokenizer = _byte_level_tokenizer(reader, tokens, path)
    special = [
        tokens[i] for i, t in enumerate(token_types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN) and tokens[i]
    ]
    user = [tokens[i] for i, t in enumerate(token_types) if t == TOKEN_USER_DEFINED and tokens[i]]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    post_processor = _post_processor(reader, tokens)
    if post_processor is not None:
        tokenizer.post_processor = post_processor
    elif kind == "gpt2":
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def tokenizer_config(reader: Any, model_max_length: int) -> dict[str, Any]:
    """``tokenizer_config.json`` contents: special tokens, BOS/EOS policy and the chat template."""
    tokens: list[str] = list(gguf_value(reader, "tokenizer.ggml.tokens"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": _adds(reader, "bos"),
        "add_eos_token": _adds(reader, "eos"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    for role, key in _ROLE_KEYS.items():
        token = _token(reader, key, tokens)
        if token is not None:
            config[f"{role}_token"] = token
    template = gguf_value(reader, "tokenizer.chat_template", None)
    if template:
        config["chat_template"] = str(template)
    else:
        logger.warning(
            "GGUF file %s carries no chat template; chat requests will need one", reader.data.filename
        )
    return config


def write_tokenizer_files(reader: Any, out_dir: Path, model_max_length: int) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` for the GGUF file into ``out_dir``."""
    build_tokenizer(reader).save(str(out_dir / "tokenizer.json"))
    config = tokenizer_config(reader, model_max_length)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
