"""Weight loading: from what the user named to HF-named tensors.

``resolve_model`` turns a ModelConfig into a local HF-format directory (converting GGUF files, and the
embedded default SmolLM2-135M-Instruct, once into the user cache) plus its transformers config;
``iterate_weights`` streams ``(hf_name, tensor)`` pairs from it; ``load_dummy_weights`` fills a model with
deterministic random values instead. Nothing here downloads anything; every problem on disk raises
ValueError naming the file and the problem.
"""

from __future__ import annotations

from treadle_model_runner.loader.cache import convert_gguf_cached, models_cache_dir
from treadle_model_runner.loader.default_model import default_model_path
from treadle_model_runner.loader.dummy import load_dummy_weights, make_dummy_model_dir
from treadle_model_runner.loader.gguf_convert import convert_gguf
from treadle_model_runner.loader.resolve import (
    ResolvedModel,
    convert_gguf_to_cache,
    load_hf_config,
    resolve_model,
)
from treadle_model_runner.loader.weights import iterate_weights

__all__ = [
    "ResolvedModel",
    "convert_gguf",
    "convert_gguf_cached",
    "convert_gguf_to_cache",
    "default_model_path",
    "iterate_weights",
    "load_dummy_weights",
    "load_hf_config",
    "make_dummy_model_dir",
    "models_cache_dir",
    "resolve_model",
]
