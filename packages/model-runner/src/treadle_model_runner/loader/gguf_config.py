"""A GGUF file's model metadata as HF ``config.json`` and ``generation_config.json``.

Theory: llama.cpp writes the hyperparameters as ``<arch>.<key>`` metadata (``llama.embedding_length``,
``llama.attention.head_count_kv``, ...) and the special token ids as ``tokenizer.ggml.*_token_id``. The keys
every family shares map onto the Llama-shaped fields of its HF config (LlamaConfig, Qwen2Config, ...), written
here; what one family adds (Gemma's sliding layers and softcaps, Phi-3's longrope, Granite's multipliers,
experts) is gguf_family_config.py's. Embeddings are tied exactly when the file has no ``output.weight``
(llama.cpp then reuses ``token_embd`` for the logits).

Invariants: the written config loads with ``transformers.AutoConfig.from_pretrained`` offline and gives the
HF model the same shapes as the GGUF tensors; a value the file lacks falls back to the llama.cpp default.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from treadle_model_runner.loader.gguf_family_config import apply_family_config
from treadle_model_runner.loader.gguf_weights import gguf_architecture, gguf_model_kind, gguf_value

logger = logging.getLogger(__name__)

# llama3-style rope (a rope_freqs tensor in the GGUF) stores only the resulting per-dim factors; these are
# the values every Llama 3.1/3.2 release uses for the parameters the factors do not record.
_LLAMA3_ROPE_DEFAULTS = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _eos_token_ids(reader: Any) -> list[int]:
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = gguf_value(reader, f"tokenizer.ggml.{key}", None)
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def _rope_scaling(reader: Any, arch: str) -> dict[str, Any] | None:
    kind = gguf_value(reader, f"{arch}.rope.scaling.type", None)
    factor = gguf_value(reader, f"{arch}.rope.scaling.factor", None)
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        llama3_factor = float(max(freqs.data.astype("float32").tolist()))
        logger.warning(
            "GGUF file %s uses llama3 rope scaling (factor %.1f); assuming low/high freq factors 1/4 and "
            "original context 8192",
            reader.data.filename,
            llama3_factor,
        )
        return {"rope_type": "llama3", "factor": llama3_factor, **_LLAMA3_ROPE_DEFAULTS}
    if kind in (None, "none") or factor in (None, 0.0, 1.0):
        return None
    if kind not in ("linear", "yarn"):
        raise ValueError(
            f"GGUF file {reader.data.filename} uses rope scaling {kind!r}; treadle converts linear and yarn"
        )
    scaling: dict[str, Any] = {"rope_type": str(kind), "factor": float(factor)}
    original = gguf_value(reader, f"{arch}.rope.scaling.original_context_length", None)
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def hf_config_dict(reader: Any, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` contents for the GGUF file, weights stored in ``dtype``."""
    arch = gguf_architecture(reader)

    def meta(key: str, default: Any = None) -> Any:
        return gguf_value(reader, f"{arch}.{key}", default)

    hidden_size = int(meta("embedding_length"))
    num_heads = int(meta("attention.head_count"))
    num_tokens = len(gguf_value(reader, "tokenizer.ggml.tokens", []))
    tensor_names = {t.name for t in reader.tensors}
    eos_ids = _eos_token_ids(reader)
    head_dim = int(meta("attention.key_length", meta("rope.dimension_count", hidden_size // num_heads)))
    kind = gguf_model_kind(reader)
    config: dict[str, Any] = {
        "architectures": [kind.hf_architecture],
        "model_type": kind.model_type,
        "hidden_size": hidden_size,
        "intermediate_size": int(meta("feed_forward_length", meta("expert_feed_forward_length"))),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(meta("context_length", 2048)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        # Phi-3's longrope comes from its factor tensors (gguf_family_config.py)
        "rope_scaling": None if arch == "phi3" else _rope_scaling(reader, arch),
        "vocab_size": int(meta("vocab_size", num_tokens)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
        "bos_token_id": gguf_value(reader, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
        "pad_token_id": gguf_value(reader, "tokenizer.ggml.padding_token_id", None),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    apply_family_config(reader, arch, kind.model_type, config)
    if config["bos_token_id"] is not None:
        config["bos_token_id"] = int(config["bos_token_id"])
    if config["pad_token_id"] is not None:
        config["pad_token_id"] = int(config["pad_token_id"])
    return config


def generation_config_dict(reader: Any) -> dict[str, Any]:
    """``generation_config.json`` contents: the ids generation starts and stops on."""
    eos_ids = _eos_token_ids(reader)
    config: dict[str, Any] = {"eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids}
    for key, gguf_key in (("bos_token_id", "bos_token_id"), ("pad_token_id", "padding_token_id")):
        value = gguf_value(reader, f"tokenizer.ggml.{gguf_key}", None)
        if value is not None:
            config[key] = int(value)
    return config
