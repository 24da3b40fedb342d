"""Multimodal checkpoints served as text-only models: the language model of a vision-language checkpoint.

Theory: a checkpoint whose config.json names a wrapper architecture in `WRAPPERS` (Gemma 3 4B-27B's
Gemma3ForConditionalGeneration, Mistral Small 3.1/3.2's Mistral3ForConditionalGeneration) holds a text model that
treadle already serves (config.json's `text_config`), under a name prefix, beside a vision tower and a projector.
treadle serves that text model alone:
- config: the engine sees `text_config` everywhere (vocab, context length, layers, heads, eos ids), named with the
  text architecture, plus the top-level fields in `CARRIED_FIELDS` (the top-level one wins where both are set:
  Gemma 3 puts its eos ids [1, 106] there, its text_config holding only the class default);
- weights: `MultimodalWrapper.model_name` strips the language model's prefix and skips the vision tower's and the
  projector's tensors before they are read, so they are never loaded nor allocated.
Two layouts are in the wild, and both load: transformers 4.x's (`language_model.model.layers...`,
`language_model.lm_head.weight`, `vision_tower...`, `multi_modal_projector...`), which transformers 5's
`save_pretrained` still writes, and transformers 5's module names (`model.language_model.layers...`,
`lm_head.weight`, `model.vision_tower...`, `model.multi_modal_projector...`), which other exporters write.

Invariants: images are never accepted (the frontend refuses non-text content parts with a 400); a tensor name
under neither layout is handed on unchanged, so the model's loader refuses it by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["CARRIED_FIELDS", "WRAPPERS", "MultimodalWrapper", "multimodal_wrapper", "text_config_of"]

# (checkpoint prefix, model prefix) of the language model's tensors, in both layouts (module docstring);
# transformers 5's lm_head.weight is the text model's name already
_LANGUAGE_MODEL_PREFIXES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
)
# checkpoint prefixes of the tensors treadle does not serve, in both layouts
_VISION_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)
# top-level config.json fields the text model takes from the wrapper's config
CARRIED_FIELDS = ("quantization_config", "eos_token_id")


@dataclass(frozen=True, slots=True)
class MultimodalWrapper:
    architecture: str  # config.json's architecture, e.g. "Gemma3ForConditionalGeneration"
    text_architecture: str  # the architecture of its text_config, as the model registry names it
    renames: tuple[tuple[str, str], ...] = _LANGUAGE_MODEL_PREFIXES  # (checkpoint prefix, model prefix)
    skipped: tuple[str, ...] = _VISION_PREFIXES  # checkpoint prefixes of tensors never read

    def model_name(self, checkpoint_name: str) -> str | None:
        """The text model's name of a checkpoint tensor; None for a tensor that is not served (never read)."""
        if checkpoint_name.startswith(self.skipped):
            return None
        for prefix, model_prefix in self.renames:
            if checkpoint_name.startswith(prefix):
                return model_prefix + checkpoint_name.removeprefix(prefix)
        return checkpoint_name


WRAPPERS = {
    wrapper.architecture: wrapper
    for wrapper in (
        MultimodalWrapper("Gemma3ForConditionalGeneration", "Gemma3ForCausalLM"),
        MultimodalWrapper("Mistral3ForConditionalGeneration", "MistralForCausalLM"),
    )
}


def multimodal_wrapper(hf_config: Any) -> MultimodalWrapper | None:
    """The wrapper entry of a config whose architecture is a multimodal one treadle serves as text; else None."""
    for name in getattr(hf_config, "architectures", None) or []:
        if name in WRAPPERS:
            return WRAPPERS[name]
    return None


def text_config_of(hf_config: Any, wrapper: MultimodalWrapper) -> Any:
    """The config of the text model of `hf_config` (a wrapper's config): its `text_config`, named with the text
    architecture, with the wrapper's `CARRIED_FIELDS` where the wrapper sets them."""
    text = getattr(hf_config, "text_config", None)
    if text is None:
        raise ValueError(
            f"config.json names architecture {wrapper.architecture} but has no text_config: treadle serves this "
            "architecture's language model only, which text_config describes; the config.json is incomplete"
        )
    text.architectures = [wrapper.text_architecture]
    for field in CARRIED_FIELDS:
        value = getattr(hf_config, field, None)
        if value is not None:
            setattr(text, field, value)
    return text
