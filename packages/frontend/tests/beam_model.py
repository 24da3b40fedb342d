"""The tiny random Llama the beam-search tests share: sharpened weights (no near-ties among candidates) and its
EOS made a likely token, built on the spot next to the tiny tokenizer (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tiny_assets import build_tokenizer_dir

EOS = 2  # the tiny tokenizer's eos_token ("<|im_end|>")
PROMPTS = [[5, 17, 33, 90, 41], [120, 7, 260, 99], [301, 12, 12, 48, 77, 150]]


def hf_model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=400, max_position_embeddings=64, bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
        tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # sharper distributions: no near-ties among the candidates
    return model


def greedy(model: Any, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def make_eos_likely(model: Any) -> None:
    """Swaps the (tied) embedding rows of EOS and of the token the greedy path of PROMPTS[0] takes third: that
    path then ends with EOS at its third token, and EOS is a strong candidate elsewhere too."""
    path = greedy(model, PROMPTS[0], 3)
    token = path[2]
    assert token not in {0, 1, EOS, *path[:2]} and all(token not in p for p in PROMPTS), path
    with torch.no_grad():
        rows = model.model.embed_tokens.weight
        rows[[EOS, token]] = rows[[token, EOS]].clone()
    assert greedy(model, PROMPTS[0], 3) == [*path[:2], EOS]


def build_model_dir(path: Path) -> Any:
    """Writes the tokenizer and the model (safetensors) into `path`; returns the HF model."""
    build_tokenizer_dir(path)
    model = hf_model()
    make_eos_likely(model)
    model.save_pretrained(path, safe_serialization=True)
    return model
