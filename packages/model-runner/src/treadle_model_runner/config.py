"""Configs owned by the model runner: what model to load and how much KV cache to give it.

One frozen dataclass per concern; the engine composes them. Every field documented; derived values are
properties; validation in __post_init__ with errors that name the value and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from treadle_model_runner.sampling_params import DEFAULT_MAX_LOGPROBS

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "flashinfer")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")  # auto = the model dtype; fp8 = fp8_e4m3
# fp8: online weight quantization, or an fp8 checkpoint as it is; the others only name a checkpoint's own format
# (vLLM's names, Marlin's kernel variants included), for a checkpoint that is one (None: weights in the model dtype,
# or the checkpoint's own scheme): compressed-tensors (fp8 or 4-bit), awq, gptq (4-bit), mxfp4 (gpt-oss's experts:
# 4-bit on CUDA, dequantized at load elsewhere)
QUANTIZATIONS = ("fp8", "compressed-tensors", "awq", "gptq", "awq_marlin", "gptq_marlin", "mxfp4")
C = TypeVar("C")


# vLLM's sequence pooling types: the last prompt token's final hidden state, the mean over the prompt's, the first's
POOLING_TYPES = ("LAST", "MEAN", "CLS")


def config_from_json(cls: type[C], value: C | dict[str, Any] | str, name: str) -> C:
    """`cls` from itself, a dict or its JSON text (a CLI flag's value, e.g. --pooler-config): a key that is not one of
    its fields is a ValueError naming it and the valid ones; `name` is the option's, for the messages."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"{name} {value!r} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object (or a {cls.__name__}), got {value!r}")
    known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ValueError(
            f"{name}: {', '.join(map(repr, unknown))} not supported; its keys are {', '.join(known)}"
        )
    return cls(**value)


@dataclass(frozen=True)
class PoolerConfig:
    """How an embedding pools the prompt's final hidden states: vLLM's PoolerConfig, set per engine
    (`LLM(pooler_config=...)`, `treadle serve --pooler-config '{"pooling_type": "MEAN", "normalize": false}'`)."""

    pooling_type: str = "LAST"  # LAST | MEAN | CLS (any case)
    normalize: bool = True  # L2-normalise the pooled vector (a request's own `normalize` overrides it)

    def __post_init__(self) -> None:
        kind = self.pooling_type.upper() if isinstance(self.pooling_type, str) else self.pooling_type
        if kind in ("ALL", "STEP"):
            raise ValueError(
                f"pooler_config pooling_type {self.pooling_type!r} pools token by token, which this server does "
                f"not serve; use one of {', '.join(POOLING_TYPES)}"
            )
        if kind not in POOLING_TYPES:
            raise ValueError(
                f"pooler_config pooling_type {self.pooling_type!r} is not one of {', '.join(POOLING_TYPES)}"
            )
        if not isinstance(self.normalize, bool):
            raise ValueError(f"pooler_config normalize must be true or false, got {self.normalize!r}")
        object.__setattr__(self, "pooling_type", kind)

    @classmethod
    def parse(cls, value: PoolerConfig | dict[str, Any] | str | None) -> PoolerConfig:
        """A PoolerConfig from itself, a dict or its JSON text (--pooler-config); None: the defaults."""
        return cls() if value is None else config_from_json(cls, value, "pooler_config")


def parse_hf_overrides(value: dict[str, Any] | str | None) -> dict[str, Any] | None:
    """hf_overrides from a dict or its JSON text (--hf-overrides); None or {} is None."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"hf_overrides {value!r} is not JSON: {e}") from None
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"hf_overrides must be a JSON object of config.json fields, got {value!r}")
    return dict(value) if value else None


@dataclass(frozen=True)
class ModelConfig:
    model: str  # HF-format directory (config.json + safetensors), a .gguf file, or a config dir for dummy
    tokenizer: str | None = None  # tokenizer directory; None = the model directory
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    max_model_len: int | None = None  # None = from the model's config
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    seed: int = 0  # seed for dummy weights and for requests without a seed
    served_model_name: str | None = None  # the name clients use; None = the directory name
    attention_backend: str = "auto"  # auto | torch | triton | flashinfer
    enforce_eager: bool = False  # no CUDA graphs
    tensor_parallel_size: int = 1  # devices (one process each) the model's heads and columns are split across
    # MoE models with tensor_parallel_size > 1: each rank holds whole routed experts (E / tensor_parallel_size of
    # them) instead of a slice of every expert's columns (vLLM's enable_expert_parallel); no effect on one device
    enable_expert_parallel: bool = False
    # most logprobs / prompt_logprobs a request may ask for (vLLM's max_logprobs); -1 = the whole vocabulary
    max_logprobs: int = DEFAULT_MAX_LOGPROBS
    # None: weights in the model dtype; "fp8": each dense projection's weight quantized at load to float8_e4m3fn
    # with one fp32 scale per output channel, activations quantized per token for the fp8 matmul (vLLM's online
    # fp8; the embedding and lm_head stay in the model dtype). A checkpoint whose config.json holds an fp8
    # quantization_config loads as it is with None or "fp8", a 4-bit one (AWQ, GPTQ, compressed-tensors W4A16) with
    # None or its method's name (model-runner quantization/plan.py)
    quantization: str | None = None
    # how embeddings pool the prompt (a dict or its JSON text is parsed into a PoolerConfig)
    pooler_config: PoolerConfig = field(default_factory=PoolerConfig)
    # config.json fields replaced before the model config is built (vLLM's hf_overrides; a dict or its JSON
    # text), e.g. {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, ...}} for a longer context
    hf_overrides: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "pooler_config", PoolerConfig.parse(self.pooler_config))
        object.__setattr__(self, "hf_overrides", parse_hf_overrides(self.hf_overrides))
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization {self.quantization!r} is not supported; supported: {', '.join(QUANTIZATIONS)} "
                "(or None for weights in the model dtype)"
            )
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format {self.load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend {self.attention_backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}"
            )
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not isinstance(self.enable_expert_parallel, bool):
            raise ValueError(
                f"enable_expert_parallel must be true or false, got {self.enable_expert_parallel!r}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < -1:
            raise ValueError(
                "max_logprobs must be an integer >= -1 (-1: no limit, the whole vocabulary), "
                f"got {self.max_logprobs!r}"
            )


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    gpu_memory_utilization: float = 0.9  # share of GPU memory treadle may use (weights + activations + KV)
    kv_cache_space: float = 4.0  # GiB of KV cache on CPU
    enable_prefix_caching: bool = True  # reuse KV blocks across requests with a common prefix
    num_gpu_blocks_override: int | None = None  # fix the block count (tests, benchmarks)
    # auto = the model dtype; fp8 / fp8_e4m3 / fp8_e5m2 store K/V in 8 bits at unit scale (half of bf16's bytes:
    # twice the tokens, half the KV reads of a decode step), saturating at the format's largest value
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be a power of two in [1, 128], got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_space <= 0:
            raise ValueError(f"kv_cache_space must be > 0 GiB, got {self.kv_cache_space}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype {self.kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}"
            )
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 2:
            raise ValueError(f"num_gpu_blocks_override must be >= 2, got {self.num_gpu_blocks_override}")


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA serving (vLLM's --enable-lora family): adapters in PEFT format, chosen per request."""

    enable_lora: bool = False  # accept requests naming a LoRA adapter (the other fields apply only then)
    max_loras: int = 1  # most distinct adapters in one step: the device slots every LoRA layer holds
    max_lora_rank: int = 16  # largest adapter rank accepted; each slot is this wide
    # adapters kept loaded in host memory (the least recently used go first); None = max_loras
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}; raise --max-loras")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}; raise --max-lora-rank")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras}): every adapter of "
                "a step is also held in host memory; raise --max-cpu-loras or lower --max-loras"
            )

    @property
    def num_cpu_loras(self) -> int:
        """Adapters the host-memory cache holds."""
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras


SPECULATIVE_METHODS = ("ngram", "draft_model", "eagle3")
# the methods whose drafts the model runner proposes (a model beside the target), not the scheduler
RUNNER_DRAFT_METHODS = ("draft_model", "eagle3")


def infer_method(model: str | None) -> str:
    """The speculative method of a config that names none, as vLLM infers it: ngram without a model; for a model, eagle3
    when its path says "eagle3" or its config.json is an EAGLE-3 head's (an architecture naming Eagle3, or RedHat's
    speculators_model_type "eagle3"); eagle when its path says "eagle-" (EAGLE-1, e.g. yuhuili/EAGLE-LLaMA3-Instruct-8B;
    refused as not supported); else draft_model."""
    if not model:
        return "ngram"
    name = model.lower()
    if "eagle3" in name:
        return "eagle3"
    if "eagle-" in name:
        return "eagle"
    try:
        with open(f"{model}/config.json", encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return "draft_model"
    if not isinstance(config, dict):
        return "draft_model"
    architectures = config.get("architectures")
    names = [str(a).lower() for a in architectures] if isinstance(architectures, list) else []
    if any("eagle3" in n for n in names) or config.get("speculators_model_type") == "eagle3":
        return "eagle3"
    return "draft_model"


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (vLLM's speculative_config): a proposer drafts tokens, one step verifies them all.

    ngram (prompt lookup): the longest suffix of the request's tokens (between prompt_lookup_min and
    prompt_lookup_max tokens long) that also occurs earlier in its prompt + output proposes the tokens that
    followed that earlier occurrence, at most num_speculative_tokens of them.
    draft_model: a smaller model sharing the target's tokenizer (`model`, loaded like the target, in its dtype)
    runs beside it with its own layers in the same paged KV cache and proposes its greedy continuation
    (runner/draft_model.py).
    eagle3: an EAGLE-3 head (`model`: its checkpoint directory) reads the target's hidden states at three layers
    and the target's embedding, and proposes its greedy continuation (runner/eagle3.py).
    Either way the target model scores the last token plus the drafts in one step; drafts are kept while they
    equal what the model samples at their position, so the output is the same as without speculation.
    """

    # None: inferred as vLLM does (`infer_method`): ngram without a model; eagle3 for an EAGLE-3 head; eagle (not
    # supported here) for an EAGLE-1 one; else draft_model
    method: str | None = None
    num_speculative_tokens: int = 5  # most draft tokens per request per step
    # draft_model: the draft's HF-format directory (or a .gguf file); eagle3: the EAGLE-3 head's directory
    model: str | None = None
    # draft_model: the draft runs sharded like the target, so None or the target's tensor_parallel_size
    draft_tensor_parallel_size: int | None = None
    # the longest n-gram matched (None: prompt_lookup_min, or 5 when both are None, as vLLM)
    prompt_lookup_max: int | None = None
    # the shortest n-gram matched (None: prompt_lookup_max, or 5 when both are None)
    prompt_lookup_min: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "num_speculative_tokens",
            "prompt_lookup_max",
            "prompt_lookup_min",
            "draft_tensor_parallel_size",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool)) and (
                value is not None or name == "num_speculative_tokens"
            ):
                raise ValueError(f"speculative_config {name} must be an integer, got {value!r}")
        if self.model is not None and not (isinstance(self.model, str) and self.model):
            raise ValueError(f"speculative_config model must be a path, got {self.model!r}")
        if self.method is None:
            object.__setattr__(self, "method", infer_method(self.model))
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(
                f"speculative_config method {self.method!r} is not supported; "
                f"supported: {', '.join(SPECULATIVE_METHODS)}"
            )
        if self.method == "draft_model" and not self.model:
            raise ValueError("speculative_config method 'draft_model' needs a model (the draft's directory)")
        if self.method == "eagle3" and not self.model:
            raise ValueError(
                "speculative_config method 'eagle3' needs a model: the EAGLE-3 head's directory (config.json and "
                "its weights, e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B)"
            )
        if self.method not in RUNNER_DRAFT_METHODS and self.model is not None:
            raise ValueError(
                f"speculative_config model {self.model!r} is for method 'draft_model', not {self.method!r} "
                "(or for 'eagle3': an EAGLE-3 head)"
            )
        if self.num_speculative_tokens < 1:
            raise ValueError(
                f"speculative_config num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}"
            )
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if lo is None and hi is None:
            lo = hi = 5
        lo = hi if lo is None else lo
        hi = lo if hi is None else hi
        assert lo is not None and hi is not None
        if lo < 1 or hi < lo:
            raise ValueError(
                "speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                f"prompt_lookup_min={self.prompt_lookup_min}, prompt_lookup_max={self.prompt_lookup_max}"
            )
        object.__setattr__(self, "prompt_lookup_min", lo)
        object.__setattr__(self, "prompt_lookup_max", hi)

    @property
    def drafts_in_runner(self) -> bool:
        """Whether the model runner proposes the drafts after each step (draft_model, eagle3), not the scheduler."""
        return self.method in RUNNER_DRAFT_METHODS
