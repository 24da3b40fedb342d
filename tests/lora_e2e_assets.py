"""Test helpers (no tests here): a tiny random Llama with a trained tokenizer and two PEFT adapters, "sql" (every
projection, rank 8) and "poet" (k, v and down, rank 4), with PEFT's own outputs for them."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from tiny_assets import build_tokenizer_dir

from treadle import LoRARequest, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "packages" / "model-runner" / "tests"))
from lora_fixtures import PeftReference, save_adapter

__all__ = ["ADAPTER_OF", "ENGINE", "GREEDY", "PROMPTS", "PeftReference", "Tiny", "build_tiny"]

# the offline engines and the mixed batch the LoRA end-to-end tests run: six prompts over base, sql and poet rows
ENGINE: dict[str, Any] = {"max_model_len": 128, "kv_cache_space": 0.02, "dtype": "float32"}
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = [[5 + i, 40 + 3 * i, 17, 200 - i, 9] for i in range(6)]
ADAPTER_OF = [None, "sql", "poet", "sql", "poet", None]


@dataclass
class Tiny:
    model: Path
    adapters: dict[str, Path]
    peft: PeftReference

    def request(self, name: str | None) -> LoRARequest | None:
        if name is None:
            return None
        return LoRARequest(name, list(self.adapters).index(name) + 1, str(self.adapters[name]))


def build_tiny(root: Path) -> Tiny:
    model = build_tokenizer_dir(root / "model")
    config = tf.LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape) * 0.15)
    hf.save_pretrained(model, safe_serialization=True)
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapters = {
        "sql": save_adapter(hf, root / "sql", seed=1, r=8, alpha=16, targets=every),
        "poet": save_adapter(hf, root / "poet", seed=2, r=4, alpha=8, targets=every[1:3] + every[-1:]),
    }
    return Tiny(model, adapters, PeftReference(hf, adapters))
