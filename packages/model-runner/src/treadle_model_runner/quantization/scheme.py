"""What a pre-quantized checkpoint's config.json says about its fp8 layout: `Fp8CheckpointScheme`, parsed from its
`quantization_config` by `parse_quantization_config`. Two formats load, each with three weight layouts:

compressed-tensors (llm-compressor's "...-FP8-dynamic", "...-FP8" and "...-FP8-BLOCK" models): `quant_method:
"compressed-tensors"`, config groups read by compressed_tensors.py, applied to the modules their `targets` name
("Linear": every projection; otherwise exact names or "re:" regexes) except those `ignore` names (same spelling).
Tensors: `<proj>.weight` float8_e4m3fn [n, k]; `<proj>.weight_scale` fp32 [n, 1] (strategy "channel"), one value
("tensor") or [ceil(n / block_n), ceil(k / block_k)] ("block", `block_structure: [block_n, block_k]`);
`<proj>.input_scale` one value (static activations).

fp8 (AutoFP8 / vLLM's serialized fp8, transformers' FineGrainedFP8 and the DeepSeek-V3 / Qwen3-FP8 checkpoints):
`quant_method: "fp8"`, `activation_scheme: "dynamic" | "static"`, `fmt: "e4m3"`. Without `weight_block_size`: a
per-tensor `weight_scale` per projection, and `input_scale` when static; dynamic activations run per token (vLLM
quantizes this format's dynamic activations per tensor; per token is at least as fine). With `weight_block_size:
[block_n, block_k]`: `<proj>.weight_scale_inv` fp32 [ceil(n / block_n), ceil(k / block_k)] (despite its name, the
dequantized weight is weight * scale per block), activations dynamic per token group (1 x block_k), as the
checkpoint's own GEMM does; a static activation scheme is refused there. Modules left unquantized:
`ignored_layers` (exact names or their parents, as vLLM reads them) and `modules_to_not_convert` (transformers'
spelling: a dotted name matched at module boundaries anywhere in the name, "lm_head" or "mlp.gate");
`modules_to_convert`, when given, limits the quantized modules the same way.

4-bit weight-only checkpoints (awq, gptq, compressed-tensors with 4-bit integer weights) are int4_scheme.py's
(`Int4CheckpointScheme`); `parse_quantization_config` hands them over.
Block layouts run `ops.fp8_block_linear` (treadle_ir.ops.fp8_block); under stacking (qkv, gate_up) and tensor
parallelism their scale grids are cut and joined in whole blocks, so every shard a projection is cut into must be a
multiple of block_n rows (block_k columns for the row-parallel input split): checked at load
(quantization/checkpoint.py), naming config.json, its block field and the projection.
Every other method or field value (int8, other bit widths, group-wise fp8 weights, asymmetric, output activations,
sparsity or transforms, scale formats other than fp32) is a ValueError naming config.json, the field and its value.
K/V cache scales (`kv_cache_scheme`) are noted: the loader drops them (quantization/checkpoint.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from treadle_model_runner.quantization.compressed_tensors import block_size, read_compressed_tensors
from treadle_model_runner.quantization.int4_scheme import (
    Int4CheckpointScheme,
    is_int4_config,
    parse_int4_config,
)

__all__ = [
    "CheckpointScheme",
    "ConfigFields",
    "Fp8CheckpointScheme",
    "parse_quantization_config",
    "quantization_config_of",
]

LOADABLE_METHODS = ("compressed-tensors", "fp8")


@dataclass(frozen=True)
class Fp8CheckpointScheme:
    quant_method: str  # config.json's quant_method: "compressed-tensors" or "fp8"
    # "channel": one weight scale per output row; "tensor": one per projection; "block": one per weight tile
    weight_strategy: str
    static_activations: bool  # True: each projection's input quantized with its input_scale; False: dynamic
    targets: tuple[str, ...]  # modules stored in fp8: "Linear" (every projection), exact names, "re:" regexes
    ignore: tuple[str, ...]  # modules left in the model dtype: exact names (or their parents), "re:" regexes
    has_kv_cache_scales: bool  # config.json declares K/V cache scales (kv_cache_scheme), which treadle drops
    config_file: Path  # the config.json it was read from (named in load errors)
    weight_block: tuple[int, int] | None = None  # (block_n, block_k) of "block" weights; else None
    block_field: str = ""  # the quantization_config field giving weight_block (for errors)
    scale_name: str = "weight_scale"  # the weight scales' tensor suffix in the files ("weight_scale_inv" too)

    def quantizes(self, hf_module: str) -> bool:
        """Whether the checkpoint holds HF projection `hf_module` (e.g. model.layers.0.self_attn.q_proj) in fp8."""
        targeted = any(t == "Linear" or _matches(hf_module, t) for t in self.targets)
        return targeted and not any(_matches(hf_module, i) for i in self.ignore)

    def describe(self) -> str:
        if self.weight_block is not None:
            block_n, block_k = self.weight_block
            return (
                f"fp8 checkpoint ({self.quant_method}: {block_n}x{block_k} block weight scales, dynamic "
                f"per-token-group (1x{block_k}) activations)"
            )
        activations = "static per-tensor" if self.static_activations else "dynamic per-token"
        return (
            f"fp8 checkpoint ({self.quant_method}: per-{self.weight_strategy} weight scales, "
            f"{activations} activations)"
        )


CheckpointScheme = Fp8CheckpointScheme | Int4CheckpointScheme  # a pre-quantized checkpoint's layout


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.startswith(pattern + ".")


def _anywhere(module: str) -> str:
    """transformers' module-name match as a "re:" pattern: `module` as whole dotted components anywhere."""
    return rf"re:(.*\.)?{re.escape(module)}(\..*)?$"


def quantization_config_of(hf_config: Any) -> dict[str, Any] | None:
    """config.json's quantization_config as a dict (transformers may hold it as an object), or None."""
    raw = getattr(hf_config, "quantization_config", None)
    if raw is None or isinstance(raw, dict):
        return raw
    to_dict = getattr(raw, "to_dict", None)
    if to_dict is None and not hasattr(raw, "__dict__"):
        raise ValueError(f"quantization_config must be a JSON object, got {raw!r}")
    return dict(to_dict()) if to_dict is not None else dict(vars(raw))


def parse_quantization_config(raw: dict[str, Any], config_file: Path) -> CheckpointScheme:
    """The fp8 or 4-bit layout config.json's `quantization_config` describes; ValueError (naming `config_file`, the
    field and its value) for anything treadle cannot load as it is."""
    method = raw.get("quant_method")
    if isinstance(method, str):  # as vLLM reads it: any case, compressed_tensors for compressed-tensors
        method = method.lower().replace("_", "-")
    if isinstance(method, str) and is_int4_config(raw, method):
        return parse_int4_config(raw, method, config_file)
    fields = ConfigFields(config_file)
    if method == "compressed-tensors":
        layout = read_compressed_tensors(raw, fields)
        return Fp8CheckpointScheme(
            quant_method="compressed-tensors",
            weight_strategy=layout.weight_strategy,
            static_activations=layout.static_activations,
            targets=layout.targets,
            ignore=layout.ignore,
            has_kv_cache_scales=raw.get("kv_cache_scheme") is not None,
            config_file=config_file,
            weight_block=layout.weight_block,
            block_field=layout.block_field,
        )
    if method == "fp8":
        return _fp8(raw, fields)
    raise ValueError(
        f"{config_file}: quantization_config.quant_method is {method!r}, which treadle cannot load; it loads "
        f"fp8 checkpoints with quant_method {' or '.join(repr(m) for m in LOADABLE_METHODS)} (float8_e4m3fn "
        "weights with per-channel, per-tensor or block-wise scales) and 4-bit weight-only ones with 'awq', 'gptq' "
        "or 'compressed-tensors'; serve the model's unquantized checkpoint instead, optionally with --quantization fp8"
    )


class ConfigFields:
    """Reads fields of the quantization_config; `refuse` makes the ValueError naming the file and the field."""

    def __init__(self, config_file: Path) -> None:
        self.config_file = config_file

    def refuse(self, field: str, value: object, why: str) -> ValueError:
        return ValueError(
            f"{self.config_file}: quantization_config.{field} is {value!r}: {why}; treadle loads fp8 checkpoints "
            "with float8_e4m3fn weights and per-channel, per-tensor or block-wise scales (compressed-tensors "
            "float-quantized, or quant_method fp8); serve the model's unquantized checkpoint instead"
        )

    def names(self, raw: dict[str, Any], field: str) -> list[str]:
        value = raw.get(field) or []
        if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
            raise self.refuse(field, value, "it must be a list of module names")
        return value


def _fp8(raw: dict[str, Any], fields: ConfigFields) -> Fp8CheckpointScheme:
    scheme = raw.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise fields.refuse("activation_scheme", scheme, "it must be 'dynamic' or 'static'")
    if raw.get("fmt", "e4m3") != "e4m3":
        raise fields.refuse("fmt", raw["fmt"], "only e4m3 (float8_e4m3fn) values are read")
    block = None
    if raw.get("weight_block_size") is not None:
        block = block_size(raw["weight_block_size"], "weight_block_size", fields)
        if scheme != "dynamic":
            raise fields.refuse(
                "activation_scheme",
                scheme,
                "block-wise checkpoints (weight_block_size) quantize activations dynamically per token group",
            )
        if raw.get("scale_fmt", "float") not in (None, "float"):
            raise fields.refuse("scale_fmt", raw["scale_fmt"], "only float (fp32) block scales are read")
    ignore = [
        *fields.names(raw, "ignored_layers"),
        *map(_anywhere, fields.names(raw, "modules_to_not_convert")),
    ]
    targets = [_anywhere(m) for m in fields.names(raw, "modules_to_convert")] or ["Linear"]
    return Fp8CheckpointScheme(
        quant_method="fp8",
        weight_strategy="tensor" if block is None else "block",
        static_activations=scheme == "static",
        targets=tuple(targets),
        ignore=tuple(ignore),
        has_kv_cache_scales=raw.get("kv_cache_scheme") is not None,
        config_file=fields.config_file,
        weight_block=block,
        block_field="weight_block_size" if block else "",
        scale_name="weight_scale_inv" if block else "weight_scale",
    )
