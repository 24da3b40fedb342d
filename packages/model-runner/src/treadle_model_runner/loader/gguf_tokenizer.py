"""A GGUF file's tokenizer metadata as HF ``tokenizer.json`` + ``tokenizer_config.json``.

Theory: llama.cpp's ``gpt2`` tokenizer model is byte-level BPE. The GGUF keeps the vocabulary
(``tokenizer.ggml.tokens``, already in byte-level alphabet, id = position), the merges (``"a b"`` strings,
rank = position), a type per token (1 normal, 3 control, 4 user-defined) and the name of the
pre-tokenizer regex (``tokenizer.ggml.pre``). Rebuilding the ``tokenizers`` pipeline from those pieces gives
the same ids as the original HF tokenizer: pre-tokenize (regex split, then byte-to-unicode), BPE by merge
rank, control tokens matched whole before anything else.

Invariants: token ids equal GGUF positions; control tokens are special (skipped on decode with
``skip_special_tokens``); an unknown tokenizer model or pre-tokenizer raises ValueError naming the file,
the value and the supported ones, rather than tokenizing subtly wrong.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from treadle_model_runner.loader.gguf_weights import gguf_value

logger = logging.getLogger(__name__)

_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
_QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# llama.cpp pre-tokenizer name -> how to split before byte-level BPE
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "codeshell")
_GPT2_PRE = ("gpt2", "default")
_LLAMA3_PRE = ("llama-bpe", "llama3")
_QWEN2_PRE = ("qwen2",)
SUPPORTED_PRE_TOKENIZERS = _DIGIT_SPLIT_PRE + _GPT2_PRE + _LLAMA3_PRE + _QWEN2_PRE
_ROLE_KEYS = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}  # HF role -> GGUF key infix


def _pre_tokenizer(pre: str, path: str) -> Any:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRE:
        return byte_level
    if pre in _DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _LLAMA3_PRE + _QWEN2_PRE:
        regex = _LLAMA3_REGEX if pre in _LLAMA3_PRE else _QWEN2_REGEX
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    raise ValueError(
        f"GGUF file {path} uses the pre-tokenizer {pre!r}, which treadle cannot rebuild; supported: "
        f"{', '.join(SUPPORTED_PRE_TOKENIZERS)}. Use the model's HF release (tokenizer.json) instead"
    )


def _token(reader: Any, key: str, tokens: list[str]) -> str | None:
    token_id = gguf_value(reader, key, None)
    return None if token_id is None or not 0 <= int(token_id) < len(tokens) else tokens[int(token_id)]


def build_tokenizer(reader: Any) -> Tokenizer:
    """The HF fast tokenizer described by a GGUF file's ``tokenizer.ggml.*`` metadata."""
    path = str(reader.data.filename)
    kind = gguf_value(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"GGUF file {path} has tokenizer model {kind!r}; treadle rebuilds only byte-level BPE ('gpt2') "
            "tokenizers. Use the model's HF release (tokenizer.json) instead"
        )
    tokens: list[str] = list(gguf_value(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in gguf_value(reader, "tokenizer.ggml.merges")]
    token_types: list[int] = list(gguf_value(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"GGUF file {path}: tokenizer.ggml.tokens holds duplicate tokens")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = str(gguf_value(reader, "tokenizer.ggml.pre", "default"))
    tokenizer.pre_tokenizer = _pre_tokenizer(pre, path)
    if pre in _QWEN2_PRE:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    special = [tokens[i] for i, t in enumerate(token_types) if t == _TOKEN_CONTROL]
    user = [tokens[i] for i, t in enumerate(token_types) if t == _TOKEN_USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    bos = _token(reader, "tokenizer.ggml.bos_token_id", tokens)
    if bos is not None and gguf_value(reader, "tokenizer.ggml.add_bos_token", False):
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def tokenizer_config(reader: Any, model_max_length: int) -> dict[str, Any]:
    """``tokenizer_config.json`` contents: special tokens, BOS policy and the chat template."""
    tokens: list[str] = list(gguf_value(reader, "tokenizer.ggml.tokens"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(gguf_value(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(gguf_value(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    for role in _ROLE_KEYS:
        token = _token(reader, f"tokenizer.ggml.{_ROLE_KEYS[role]}_token_id", tokens)
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
