"""Model registry: the HF `architectures` name (or, for configs built in code, the `model_type`) -> class."""

from __future__ import annotations

from typing import Any

from treadle_model_runner.loader.multimodal import WRAPPERS
from treadle_model_runner.models.base import CausalLM
from treadle_model_runner.models.deepseek import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from treadle_model_runner.models.gemma3 import Gemma2ForCausalLM, Gemma3ForCausalLM
from treadle_model_runner.models.glm4_moe import Glm4MoeForCausalLM
from treadle_model_runner.models.gpt_oss import GptOssForCausalLM
from treadle_model_runner.models.granite import GraniteForCausalLM
from treadle_model_runner.models.llama import LlamaForCausalLM
from treadle_model_runner.models.mixtral import MixtralForCausalLM
from treadle_model_runner.models.olmo2 import Olmo2ForCausalLM
from treadle_model_runner.models.phi3 import Phi3ForCausalLM
from treadle_model_runner.models.qwen import Qwen2ForCausalLM, Qwen3ForCausalLM
from treadle_model_runner.models.qwen2_moe import Qwen2MoeForCausalLM
from treadle_model_runner.models.qwen3_moe import Qwen3MoeForCausalLM
from treadle_model_runner.models.smollm3 import SmolLM3ForCausalLM

_ARCHITECTURES: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Olmo2ForCausalLM": Olmo2ForCausalLM,
    "GraniteForCausalLM": GraniteForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "SmolLM3ForCausalLM": SmolLM3ForCausalLM,
    "Glm4MoeForCausalLM": Glm4MoeForCausalLM,
    "GptOssForCausalLM": GptOssForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
}
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "granite": "GraniteForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def get_model_class(hf_config: Any) -> type[CausalLM]:
    """The model class for an HF config; ValueError listing the supported architectures otherwise."""
    names = list(getattr(hf_config, "architectures", None) or [])
    model_type = getattr(hf_config, "model_type", None)
    if not names and model_type in _MODEL_TYPES:
        names = [_MODEL_TYPES[model_type]]
    for name in names:
        if name in _ARCHITECTURES:
            return _ARCHITECTURES[name]
    raise ValueError(
        f"model architecture {names or model_type!r} is not supported; supported architectures: "
        f"{', '.join(supported_architectures())}; and as text-only models (their language model): "
        f"{', '.join(sorted(WRAPPERS))}"
    )
