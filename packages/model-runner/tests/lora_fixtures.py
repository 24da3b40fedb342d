"""Test helpers (no tests here): tiny HF decoders with random PEFT LoRA adapters, and references for them: PEFT's own
logits (`PeftReference`), or the HF model with the adapter merged into its weights (`MergedReference`).

Adapters are made with `peft.get_peft_model(..., init_lora_weights=False)`, so B is random (non-zero) and every
adapter changes the model's output; they are saved in PEFT's format, exactly what users bring.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch


def save_adapter(
    hf_model: Any,
    directory: Path,
    seed: int,
    r: int,
    alpha: float,
    targets: list[str],
    use_rslora: bool = False,
) -> Path:
    """A random LoRA adapter for `hf_model` (left untouched), saved as a PEFT directory."""
    import peft

    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, use_rslora=use_rslora, init_lora_weights=False
    )
    model = peft.get_peft_model(copy.deepcopy(hf_model), config)
    model.save_pretrained(directory)
    return directory


class PeftReference:
    """`hf_model` with every adapter of `adapters` (name -> directory) loaded by PEFT; logits and greedy
    continuations under one adapter, or the base model (name None)."""

    def __init__(self, hf_model: Any, adapters: dict[str, Path]) -> None:
        import peft

        names = list(adapters)
        model = peft.PeftModel.from_pretrained(
            copy.deepcopy(hf_model), adapters[names[0]], adapter_name=names[0]
        )
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
        self.model = model.eval()

    def _run(self, adapter: str | None, fn: Any) -> Any:
        with torch.no_grad():
            if adapter is None:
                with self.model.disable_adapter():
                    return fn()
            self.model.set_adapter(adapter)
            return fn()

    def logits(self, adapter: str | None, tokens: list[int]) -> torch.Tensor:
        """[len(tokens), vocab] fp32 logits of every position."""
        return self._run(adapter, lambda: self.model(input_ids=torch.tensor([tokens])).logits[0].float())

    def embedding(self, adapter: str | None, tokens: list[int]) -> torch.Tensor:
        """The last token's final hidden state (after the final norm), L2-normalised: last-token pooling."""

        def run() -> torch.Tensor:
            out = self.model(input_ids=torch.tensor([tokens]), output_hidden_states=True)
            return torch.nn.functional.normalize(out.hidden_states[-1][0, -1].float(), dim=0)

        return self._run(adapter, run)

    def greedy(self, adapter: str | None, prompt: list[int], max_new_tokens: int) -> list[int]:
        def generate() -> list[int]:
            out = self.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
            return [int(t) for t in out[0, len(prompt) :]]

        return list(self._run(adapter, generate))


class MergedReference:
    """`hf_model` with each adapter of `adapters` (name -> directory) merged into a copy of its weights (PEFT's
    merge_and_unload: W + scaling * B A, a plain HF model again); logits and greedy continuations as PeftReference's."""

    def __init__(self, hf_model: Any, adapters: dict[str, Path]) -> None:
        import peft

        self.models: dict[str | None, Any] = {None: hf_model.eval()}
        for name, path in adapters.items():
            merged = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), path).merge_and_unload()
            self.models[name] = merged.eval()

    def logits(self, adapter: str | None, tokens: list[int]) -> torch.Tensor:
        """[len(tokens), vocab] fp32 logits of every position."""
        with torch.no_grad():
            return self.models[adapter](input_ids=torch.tensor([tokens])).logits[0].float()

    def greedy(self, adapter: str | None, prompt: list[int], max_new_tokens: int) -> list[int]:
        with torch.no_grad():
            out = self.models[adapter].generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                                                do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
        return [int(t) for t in out[0, len(prompt) :]]


def write_adapter(
    directory: Path, hf_config: Any, seed: int, r: int, alpha: float, targets: list[str]
) -> Path:
    """A random LoRA adapter in PEFT's format written without PEFT (the GPU machine has no PEFT): every layer's
    `targets` get A [r, in] and B [out, r] of std 0.1 (qkv_proj, gate_up_proj: the stacked projections of Phi-3)."""
    import json

    from safetensors.torch import save_file

    hidden, inter = hf_config.hidden_size, hf_config.intermediate_size
    head_dim = getattr(hf_config, "head_dim", None) or hidden // hf_config.num_attention_heads
    q, kv = hf_config.num_attention_heads * head_dim, hf_config.num_key_value_heads * head_dim
    shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
              "qkv_proj": (hidden, q + 2 * kv), "gate_up_proj": (hidden, 2 * inter)}  # fmt: skip
    mlp = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
    parent = {name: "mlp" if name in mlp else "self_attn" for name in shapes}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(hf_config.num_hidden_layers):
        for name in targets:
            in_features, out_features = shapes[name]
            prefix = f"base_model.model.model.layers.{layer}.{parent[name]}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, in_features, generator=gen) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, r, generator=gen) * 0.1
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets, "bias": "none"}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory
