"""How a byte-level BPE GGUF file splits text before BPE, by llama.cpp pre-tokenizer name (``tokenizer.ggml.pre``).

Theory: llama.cpp's converter (convert_hf_to_gguf.py, ``get_vocab_base_pre``) encodes a fixed text with the
model's HF tokenizer, hashes the ids and writes the name registered for that hash; llama-vocab.cpp maps each
name to the regexes it splits with. We rebuild the split of the names below as the models' own tokenizer.json
spells it (a ``Split`` on the regex, then the byte-to-unicode map), grouped by regex:

- GPT-2's regex (``ByteLevel``'s built-in one): ``gpt2``/``gpt-2``, ``olmo`` (OLMo 1.x, GPT-NeoX's tokenizer).
- single digits, then GPT-2's regex: ``refact`` (what Granite 3.x and Granite 4 files carry: their
  StarCoder-style vocabulary hashes like Refact's), ``starcoder``, ``smollm``, ``codeshell``.
- Llama 3's (cl100k's) regex: ``llama-bpe``/``llama3``, ``dbrx`` (cl100k itself: OLMo 2's dolma2 and Phi-4's
  tokenizers hash like DBRX's), ``smaug-bpe``.
- Qwen2's regex (single digits) plus NFC: ``qwen2`` (Qwen1.5/2/2.5, Qwen1.5-MoE and Qwen2-MoE),
  ``deepseek-r1-qwen``.
- GPT-4o's (o200k's) regex, case-aware words with contractions, digits by three: ``gpt-4o`` (Phi-4-mini),
  ``llama4``.

``default`` (what files from before pre-tokenizer names carry) is taken as GPT-2's regex.

Invariants: a name not listed raises ValueError naming the file, the name and the supported ones; Llama 3's
family adds BOS when the file does not say (llama.cpp's default for those names), every other name does not.
"""

from __future__ import annotations

from typing import Any

from tokenizers import Regex, normalizers, pre_tokenizers

_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
_QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_GPT4O_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = ("gpt2", "gpt-2", "default", "olmo")
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "codeshell")
_LLAMA3_PRE = ("llama-bpe", "llama3", "dbrx", "smaug-bpe")
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen")
_GPT4O_PRE = ("gpt-4o", "llama4")
_SPLIT_REGEX = dict.fromkeys(_LLAMA3_PRE, _LLAMA3_REGEX) | dict.fromkeys(_QWEN2_PRE, _QWEN2_REGEX)
_SPLIT_REGEX |= dict.fromkeys(_GPT4O_PRE, _GPT4O_REGEX)
SUPPORTED_PRE_TOKENIZERS = _DIGIT_SPLIT_PRE + _GPT2_PRE + _LLAMA3_PRE + _QWEN2_PRE + _GPT4O_PRE
# llama.cpp adds BOS for these when the file has no tokenizer.ggml.add_bos_token
ADDS_BOS_BY_DEFAULT = ("llama-bpe", "llama3")


def byte_level_pre_tokenizer(pre: str, path: str) -> Any:
    """The ``tokenizers`` pre-tokenizer for llama.cpp pre-tokenizer ``pre``; ``path`` names the file in errors."""
    if pre in _GPT2_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _SPLIT_REGEX:
        split = pre_tokenizers.Split(Regex(_SPLIT_REGEX[pre]), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    raise ValueError(
        f"GGUF file {path} uses the pre-tokenizer {pre!r}, which treadle cannot rebuild; supported: "
        f"{', '.join(SUPPORTED_PRE_TOKENIZERS)}. Use the model's HF release (tokenizer.json) instead"
    )


def byte_level_normalizer(pre: str) -> Any:
    """Qwen2's tokenizers compose text (NFC) before splitting; the others leave it as it is."""
    return normalizers.NFC() if pre in _QWEN2_PRE else None
