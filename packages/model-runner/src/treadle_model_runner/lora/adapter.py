"""Reading a PEFT LoRA adapter directory, checked against the model it will run on.

A PEFT adapter is a directory with `adapter_config.json` (rank `r`, `lora_alpha`, `target_modules`, `use_rslora`)
and `adapter_model.safetensors`, whose tensors are named after the HF module they adapt:
    base_model.model.<module>.lora_A.weight   [r, in_features]
    base_model.model.<module>.lora_B.weight   [out_features, r]
and change that module's output to  y = x W^T + scaling * (x A^T) B^T,  scaling = lora_alpha / r
(lora_alpha / sqrt(r) with rsLoRA). The scaling is folded into B here, once. The modules are the checkpoint's: an
adapter trained on Phi-3 targets its stacked `qkv_proj` and `gate_up_proj` whole (B has every part's rows), one
trained on Llama each of q_proj, k_proj, v_proj, gate_proj, up_proj (lora/layer.py says which a model answers to).

Everything a step could trip over is checked at load, and a ValueError names the file and the problem: a missing
file, a rank above max_lora_rank, a module the model has no LoRA-capable projection for, a shape that does not
match, or a PEFT feature treadle does not run (DoRA, trained biases, modules_to_save, per-module ranks, embedding
or lm_head targets). The safetensors' tensor names decide which modules an adapter adapts, as in vLLM (PEFT keeps a
target_modules name that matched nothing), and are checked against the model's own LoRA-capable modules: an adapter
for q_proj on a model that holds qkv_proj stacked (Phi-3) is refused, naming the module to target instead.
Only safetensors are read (a pickled adapter_model.bin is refused: loading pickle runs code).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from treadle_model_runner.lora.request import LoRARequest

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# stacked projections a checkpoint may hold whole (Phi-3), adapted whole; the part names each one stacks
STACKED_TARGETS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
KNOWN_TARGETS = (*SUPPORTED_TARGETS, *STACKED_TARGETS)
_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoRAWeights:
    """One module's adapter: the low-rank pair, with the adapter's scaling already folded into B."""

    lora_a: torch.Tensor  # [rank, in_features]
    lora_b: torch.Tensor  # [out_features, rank], times scaling


@dataclass(frozen=True)
class LoRAAdapter:
    lora_id: int  # LoRARequest.lora_int_id
    name: str
    rank: int
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) (rsLoRA)
    modules: dict[str, LoRAWeights]  # HF module name ("model.layers.0.self_attn.q_proj") -> its weights


def load_adapter(
    request: LoRARequest, targets: Mapping[str, tuple[int, int]], max_rank: int, model_name: str = "the model"
) -> LoRAAdapter:
    """Read and check `request`'s adapter. `targets`: the model's LoRA-capable modules, HF name -> (in, out)."""
    directory = Path(request.lora_path).expanduser()
    if not directory.is_dir():
        raise ValueError(
            f"LoRA adapter {request.lora_name!r}: {directory} is not a directory; lora_path must name a PEFT "
            f"adapter directory holding {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    config_file = directory / CONFIG_FILE
    rank, scaling = _read_config(config_file, max_rank)
    weights_file = directory / WEIGHTS_FILE
    if not weights_file.is_file():
        pickled = " (adapter_model.bin is a pickle, which treadle does not load: save with safetensors)"
        hint = pickled if (directory / "adapter_model.bin").is_file() else ""
        raise ValueError(f"LoRA adapter {request.lora_name!r}: {weights_file} does not exist{hint}")
    modules = _read_weights(weights_file, targets, rank, scaling, model_name)
    return LoRAAdapter(request.lora_int_id, request.lora_name, rank, scaling, modules)


def _read_config(config_file: Path, max_rank: int) -> tuple[int, float]:
    """(rank, scaling) from adapter_config.json, after refusing what treadle cannot run."""
    if not config_file.is_file():
        raise ValueError(f"{config_file} does not exist: a PEFT LoRA adapter directory needs it")
    try:
        config: dict[str, Any] = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{config_file} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} must hold a JSON object, got {type(config).__name__}")

    def refuse(problem: str) -> ValueError:
        return ValueError(f"{config_file}: {problem}")

    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise refuse(f"peft_type is {peft_type!r}; only LORA adapters are supported")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise refuse(f"r (the LoRA rank) must be an integer >= 1, got {rank!r}")
    if rank > max_rank:
        raise refuse(
            f"LoRA rank {rank} is greater than max_lora_rank {max_rank}; start the engine with max_lora_rank >= "
            f"{rank} (--max-lora-rank)"
        )
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise refuse(f"lora_alpha must be a number, got {alpha!r}")
    unsupported = {
        "use_dora": config.get("use_dora"),
        "modules_to_save": config.get("modules_to_save"),
        "rank_pattern": config.get("rank_pattern"),
        "alpha_pattern": config.get("alpha_pattern"),
    }
    for key, value in unsupported.items():
        if value:
            raise refuse(f"{key} = {value!r} is not supported (treadle runs plain LoRA on the projections)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise refuse(f"bias = {config.get('bias')!r}: adapters with trained biases are not supported")
    target_modules = config.get("target_modules")
    if isinstance(target_modules, list):
        for name in target_modules:
            if str(name).rsplit(".", 1)[-1] not in KNOWN_TARGETS:
                raise refuse(
                    f"target module {name!r} is not supported; supported target modules: "
                    f"{', '.join(KNOWN_TARGETS)}"
                )
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(scaling)


def _read_weights(
    weights_file: Path, targets: Mapping[str, tuple[int, int]], rank: int, scaling: float, model_name: str
) -> dict[str, LoRAWeights]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(weights_file)
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"{weights_file} cannot be read as safetensors ({exc})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, kind = key.removeprefix(_PREFIX).rpartition(".lora_")
        if not key.startswith(_PREFIX) or kind not in ("A.weight", "B.weight"):
            raise ValueError(
                f"{weights_file}: tensor {key!r} is not a LoRA A/B weight (expected "
                f"'{_PREFIX}<module>.lora_A.weight' / '.lora_B.weight'); embeddings, biases and DoRA "
                "magnitudes are not supported"
            )
        if module not in targets:
            raise ValueError(
                f"{weights_file}: tensor {key!r} adapts module {module!r}, which {model_name} does not have "
                f"as a LoRA-capable projection; {_model_targets(module, targets, model_name)}"
            )
        pairs.setdefault(module, {})[kind[0]] = tensor
    if not pairs:
        raise ValueError(f"{weights_file} holds no LoRA weights")
    modules: dict[str, LoRAWeights] = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise ValueError(f"{weights_file}: module {module!r} has no {missing}.weight")
        a, b = pair["A"], pair["B"]
        in_features, out_features = targets[module]
        if tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
            raise ValueError(
                f"{weights_file}: module {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                f"expected ({rank}, {in_features}) and ({out_features}, {rank}) for rank {rank} on {model_name}: "
                "the adapter was trained for a different model or rank"
            )
        modules[module] = LoRAWeights(a.float(), b.float() * scaling)
    return modules


def _model_targets(module: str, targets: Mapping[str, tuple[int, int]], model_name: str) -> str:
    """The target modules `model_name` has, and which one to adapt when `module` is a part of a stacked projection
    its checkpoint holds whole."""
    leaves = dict.fromkeys(name.rpartition(".")[2] for name in targets)
    prefix, _, leaf = module.rpartition(".")
    stacked = next((s for s, parts in STACKED_TARGETS.items() if leaf in parts), None)
    listed = f"its target modules: {', '.join(leaves)}"
    if stacked is None or f"{prefix}.{stacked}" not in targets:
        return listed
    return (
        f"{listed} ({model_name}'s checkpoint holds {stacked} stacked, so an adapter trained on it targets {stacked} "
        f"whole, one lora_B over all its parts; as in vLLM, adapters for {', '.join(STACKED_TARGETS[stacked])} "
        "apart do not run on it)"
    )
