"""Startup decisions of the runner, each logged once: device, dtype, max_model_len, EOS tokens.

Also how modules are built: ``skip_param_init`` turns torch's random parameter initialisers into no-ops while
the model is constructed, since every parameter is then overwritten (checkpoint loading checks that each one
was written; dummy loading fills each one) — drawing 135M random numbers costs a second on a small CPU.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from treadle_model_runner.config import LoRAConfig, ModelConfig, SpeculativeConfig
from treadle_model_runner.layers.attention import refuse_shared_kv_message
from treadle_model_runner.layers.rotary import rope_parameters
from treadle_model_runner.parallel import get_tp

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def start_device_init(device: torch.device) -> threading.Thread | None:
    """Create the CUDA context in a side thread and return it (None on CPU): the first allocation takes from
    hundreds of ms to seconds, which the caller overlaps with reading the model config (importing transformers)."""
    if device.type != "cuda":
        return None
    thread = threading.Thread(
        target=torch.empty, args=(1,), kwargs={"device": device}, name="treadle-cuda-init"
    )
    thread.start()
    return thread


def resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto = bfloat16 on GPU, float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def check_backend_fits_model(backend: Any, model_cls: type) -> None:
    """Refuse, before any weight loads, an attention backend that cannot run the model's attention (sinks, or
    multi-head latent attention's shared key/value cache)."""
    if getattr(model_cls, "has_attention_sinks", False) and not getattr(backend, "supports_sinks", False):
        raise ValueError(
            f"{model_cls.__name__} has attention sinks, which attention backend '{backend.name}' does not support; "
            "use --attention-backend triton (the CUDA default) or torch"
        )
    if getattr(model_cls, "has_latent_attention", False) and not getattr(
        backend, "supports_shared_kv", False
    ):
        raise ValueError(f"{model_cls.__name__}: {refuse_shared_kv_message(backend.name)}")


def check_model_features(model_cls: type, quantization: str | None, lora: bool) -> None:
    """Refuse, before any weight loads, a quantization method (the plan's: "fp8", "w4a16") or LoRA adapters for an
    architecture that cannot take them (`quantization_methods`: the methods it runs, None = all; `supports_lora`
    false: DeepSeek's MLA reads kv_b_proj's weight whole, which a 4-bit checkpoint packs, and its fused
    down-projection has no adapter slots)."""
    name = model_cls.__name__
    methods = getattr(model_cls, "quantization_methods", None)
    if quantization is not None and methods is not None and quantization not in methods:
        raise ValueError(
            f"{name} does not support {quantization} weights in treadle yet (it runs {', '.join(methods)} "
            "quantization, or none): use its bf16 or fp8 checkpoint"
        )
    if lora and not getattr(model_cls, "supports_lora", True):
        raise ValueError(
            f"{name} does not support LoRA adapters in treadle yet; start it without --enable-lora"
        )


def resolve_max_model_len(requested: int | None, hf_config: Any) -> int:
    """The config's context length, or a smaller override; a larger one raises (positions were never trained).
    With YaRN rope scaling the context is original_max_position_embeddings x factor, as vLLM derives it (Qwen's
    long-context recipe adds YaRN to a config whose max_position_embeddings stays the pretraining length); with
    linear scaling (positions divided by the factor) it is max_position_embeddings x factor, as in vLLM too."""
    derived = int(getattr(hf_config, "max_position_embeddings", 0) or 0)
    source = "max_position_embeddings"
    rope = rope_parameters(hf_config)
    if rope["rope_type"] == "yarn":
        derived = int(rope["original_max_position_embeddings"] * float(rope["factor"]))
        source = "YaRN context (original_max_position_embeddings x factor)"
    elif rope["rope_type"] == "linear" and derived > 0:
        derived = int(derived * float(rope.get("factor", 1.0)))
        source = "linear rope context (max_position_embeddings x factor)"
    if requested is None:
        if derived <= 0:
            raise ValueError("config.json has no max_position_embeddings; pass --max-model-len")
        return derived
    if derived and requested > derived:
        raise ValueError(
            f"max_model_len ({requested}) is larger than the model's {source} ({derived}): "
            f"positions beyond {derived} were never trained; lower --max-model-len to at most {derived}"
        )
    return requested


def eos_token_ids(hf_config: Any, model_dir: Path) -> set[int]:
    """EOS ids from config.json and, when present, generation_config.json."""
    ids: set[int] = set()

    def add(value: Any) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)

    add(getattr(hf_config, "eos_token_id", None))
    gen_file = model_dir / "generation_config.json"
    if gen_file.is_file():
        try:
            add(json.loads(gen_file.read_text()).get("eos_token_id"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{gen_file} is not valid JSON ({exc}); fix or remove the file") from exc
    return ids


_RANDOM_INITS = (
    "uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
    "xavier_normal_", "orthogonal_",
)  # fmt: skip


@contextmanager
def skip_param_init() -> Iterator[None]:
    """Within the block, ``torch.nn.init``'s random initialisers return their tensor untouched."""

    def keep(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor

    saved = {name: getattr(torch.nn.init, name) for name in _RANDOM_INITS}
    for name in _RANDOM_INITS:
        setattr(torch.nn.init, name, keep)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules with parameters of `dtype` (restored on exit)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def check_runner_args(
    model_config: ModelConfig,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    lora_config: LoRAConfig | None,
    speculative_config: SpeculativeConfig | None,
) -> None:
    """ValueError, naming the setting, for a runner that cannot start: batch limits below 1, a tensor-parallel size
    other than this process's group's, a draft model or EAGLE-3 head with LoRA adapters (`lora_config`: enabled, or
    None), EAGLE-3 under tensor parallelism, or a draft model sharded unlike the target."""
    if max_num_seqs < 1 or max_num_batched_tokens < 1:
        raise ValueError(
            f"max_num_seqs ({max_num_seqs}) and max_num_batched_tokens ({max_num_batched_tokens}) must be >= 1"
        )
    if speculative_config and speculative_config.method == "eagle3" and model_config.tensor_parallel_size > 1:
        raise ValueError(
            f"speculative_config method 'eagle3' runs on one device; tensor_parallel_size is "
            f"{model_config.tensor_parallel_size}: use tensor_parallel_size 1, or method 'draft_model' or 'ngram'"
        )
    tp = get_tp()
    if model_config.tensor_parallel_size != tp.size:
        raise ValueError(
            f"tensor_parallel_size {model_config.tensor_parallel_size} needs a tensor-parallel group of that "
            f"size (engine_core's TensorParallelExecutor starts one process per device); this process's group "
            f"has size {tp.size}"
        )
    if lora_config is not None and speculative_config and speculative_config.drafts_in_runner:
        raise ValueError(
            f"speculative_config method {speculative_config.method!r} does not run with LoRA adapters "
            "(--enable-lora)"
        )
    draft_tp = speculative_config.draft_tensor_parallel_size if speculative_config else None
    if draft_tp is not None and draft_tp != model_config.tensor_parallel_size:
        raise ValueError(
            f"speculative_config draft_tensor_parallel_size {draft_tp}: the draft model runs sharded like the "
            f"target, so it must equal tensor_parallel_size ({model_config.tensor_parallel_size}) or be unset"
        )
