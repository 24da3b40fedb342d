"""Test assets built on the spot: a tiny byte-level BPE tokenizer with a ChatML template (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The capital of France is Paris. Hello world! How are you today?",
    "東京は日本の首都です。北京是中国的首都。",
    "Emoji 😀🎉🚀 and accents: café, naïve, señor, Zürich.",
    "def main():\n    return 42\n# numbers 0123456789",
    "the quick brown fox jumps over the lazy dog, again and again.",
]


def build_tokenizer_dir(
    path: Path, *, chat_template: bool = True, vocab_size: int = 400, extra_specials: tuple[str, ...] = ()
) -> Path:
    """Writes tokenizer.json + tokenizer_config.json (+ generation_config.json) into `path`; `extra_specials`
    are more special tokens (e.g. Mistral's `[TOOL_CALLS]`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIALS, *extra_specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    if chat_template:
        fast.chat_template = CHATML
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(path))
    return path


def write_generation_config(path: Path, **fields: object) -> None:
    (path / "generation_config.json").write_text(json.dumps(fields))


def build_metaspace_tokenizer() -> object:
    """A SentencePiece-style tokenizer (Metaspace "▁" word marker, byte fallback), like Llama 2 / Mistral."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    # Byte-fallback pieces are ordinary vocabulary entries (as in Llama's), not special tokens, so
    # skip_special_tokens keeps them. Rebuild the model with them appended.
    trained = json.loads(tok.to_str())["model"]
    vocab = dict(trained["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok.model = models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_wide_tokenizer_dir(path: Path, vocab_size: int = 49152) -> Path:
    """A byte-level tokenizer with SmolLM2's vocabulary size (49152) and the ChatML template: the byte alphabet,
    then made-up 4-letter pieces (no merges: it encodes text byte by byte, and decodes every id). For replies whose
    logprobs span the whole vocabulary."""
    import itertools

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    pieces = ("".join(p) for p in itertools.product("abcdefghijklmnopqrstuvwxyzĠ", repeat=4))
    while len(vocab) < vocab_size - len(SPECIALS):
        vocab.setdefault(next(pieces), len(vocab))
    for special in SPECIALS:
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIALS})
    fast.chat_template = CHATML
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(path))
    return path
