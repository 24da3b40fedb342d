"""A checkpoint whose chat template lives only in its processor's chat_template.json (multimodal checkpoints such as
Mistral Small 3.1 ship it so): `LLM.chat` renders with it, through the engine factory's template lookup."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_assets import build_tokenizer_dir

from treadle_frontend import LLM
from treadle_model_runner.sampling_params import SamplingParams

TEMPLATE = "{% for m in messages %}<<{{ m['role'] }}:{{ m['content'] }}>>{% endfor %}"


def test_llm_chat_uses_the_processors_chat_template(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = build_tokenizer_dir(tmp_path, chat_template=False)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=400, max_position_embeddings=128, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    (path / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    llm = LLM(str(path), dtype="float32", kv_cache_space=0.01)
    out = llm.chat(
        [{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False
    )
    assert out[0].prompt == "<<user:hi>>"
    assert len(out[0].outputs[0].token_ids) == 2
