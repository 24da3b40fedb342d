"""What a pre-quantized checkpoint's config.json says about its fp8 layout: `Fp8CheckpointScheme`, parsed from its
`quantization_config` by `parse_quantization_config`. Two formats load:

compressed-tensors (llm-compressor's "...-FP8-dynamic" / "...-FP8" models): `quant_method: "compressed-tensors"`,
`format: "float-quantized"` (or "naive-quantized", the same layout for fp8), `config_groups` whose `weights` are
`{num_bits: 8, type: "float", symmetric: true, strategy: "channel" | "tensor"}` and whose `input_activations` are
dynamic per token (`strategy: "token", dynamic: true`) or static per tensor (`strategy: "tensor", dynamic: false`),
applied to the modules their `targets` name ("Linear": every projection; otherwise exact names or "re:" regexes)
except those `ignore` names (same spelling). Dynamic per-tensor activations, and weight-only groups (no
`input_activations`), run dynamic per token, which is logged. Tensors: `<proj>.weight` float8_e4m3fn [n, k],
`<proj>.weight_scale` fp32 [n, 1] (channel) or one value (tensor), `<proj>.input_scale` one value (static).

fp8 (AutoFP8 / vLLM's serialized fp8): `quant_method: "fp8"`, `activation_scheme: "dynamic" | "static"`,
`ignored_layers`; a per-tensor `weight_scale` per projection, and `input_scale` when static. Dynamic activations
run per token (vLLM quantizes this format's dynamic activations per tensor; per token is at least as fine).

4-bit weight-only checkpoints (awq, gptq, compressed-tensors with 4-bit integer weights) are int4_scheme.py's
(`Int4CheckpointScheme`); `parse_quantization_config` hands them over.
Block-wise scales (`weight_block_size`, compressed-tensors strategy "block" / "group") need a block-scaled GEMM
treadle lacks; they, and every other method or field value (int8, asymmetric fp8, output activations, sparsity or
transforms), are a ValueError naming config.json, the field and its value.
K/V cache scales (`kv_cache_scheme`) are noted: the loader drops them (quantization/checkpoint.py).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from treadle_model_runner.quantization.int4_scheme import (
    Int4CheckpointScheme,
    is_int4_config,
    parse_int4_config,
)

logger = logging.getLogger(__name__)

__all__ = ["CheckpointScheme", "Fp8CheckpointScheme", "parse_quantization_config", "quantization_config_of"]

LOADABLE_METHODS = ("compressed-tensors", "fp8")
CT_FORMATS = (
    "float-quantized",
    "naive-quantized",
)  # compressed-tensors formats storing fp8 values as they are


@dataclass(frozen=True)
class Fp8CheckpointScheme:
    quant_method: str  # config.json's quant_method: "compressed-tensors" or "fp8"
    weight_strategy: str  # "channel": one weight scale per output row; "tensor": one per projection
    static_activations: bool  # True: each projection's input quantized with its input_scale; False: per token
    targets: tuple[str, ...]  # modules stored in fp8: "Linear" (every projection), exact names, "re:" regexes
    ignore: tuple[str, ...]  # modules left in the model dtype: exact names (or their parents), "re:" regexes
    has_kv_cache_scales: bool  # config.json declares K/V cache scales (kv_cache_scheme), which treadle drops

    def quantizes(self, hf_module: str) -> bool:
        """Whether the checkpoint holds HF projection `hf_module` (e.g. model.layers.0.self_attn.q_proj) in fp8."""
        targeted = any(t == "Linear" or _matches(hf_module, t) for t in self.targets)
        return targeted and not any(_matches(hf_module, i) for i in self.ignore)

    def describe(self) -> str:
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
    if method == "compressed-tensors":
        return _compressed_tensors(raw, _Fields(config_file))
    if method == "fp8":
        return _fp8(raw, _Fields(config_file))
    raise ValueError(
        f"{config_file}: quantization_config.quant_method is {method!r}, which treadle cannot load; it loads "
        f"fp8 checkpoints with quant_method {' or '.join(repr(m) for m in LOADABLE_METHODS)} (float8_e4m3fn "
        "weights with per-channel or per-tensor scales) and 4-bit weight-only ones with 'awq', 'gptq' or "
        "'compressed-tensors'; serve the model's unquantized checkpoint instead, optionally with --quantization fp8"
    )


class _Fields:
    """Reads fields of the quantization_config; `refuse` raises the ValueError naming the file and the field."""

    def __init__(self, config_file: Path) -> None:
        self.config_file = config_file

    def refuse(self, field: str, value: object, why: str) -> ValueError:
        return ValueError(
            f"{self.config_file}: quantization_config.{field} is {value!r}: {why}; treadle loads fp8 checkpoints "
            "with float8_e4m3fn weights and per-channel or per-tensor scales (compressed-tensors float-quantized, "
            "or quant_method fp8); serve the model's unquantized checkpoint instead"
        )


def _fp8(raw: dict[str, Any], fields: _Fields) -> Fp8CheckpointScheme:
    if raw.get("weight_block_size") is not None:
        raise fields.refuse(
            "weight_block_size",
            raw["weight_block_size"],
            "block-wise weight scales (weight_scale_inv, as in "
            "DeepSeek-V3 or Qwen3-FP8) need a block-scaled fp8 GEMM, which treadle does not have",
        )
    scheme = raw.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise fields.refuse("activation_scheme", scheme, "it must be 'dynamic' or 'static'")
    if raw.get("fmt", "e4m3") != "e4m3":
        raise fields.refuse("fmt", raw["fmt"], "only e4m3 (float8_e4m3fn) values are read")
    ignored = raw.get("ignored_layers") or []
    if not isinstance(ignored, list) or not all(isinstance(i, str) for i in ignored):
        raise fields.refuse("ignored_layers", ignored, "it must be a list of module names")
    return Fp8CheckpointScheme(
        quant_method="fp8",
        weight_strategy="tensor",
        static_activations=scheme == "static",
        targets=("Linear",),
        ignore=tuple(ignored),
        has_kv_cache_scales=raw.get("kv_cache_scheme") is not None,
    )


def _compressed_tensors(raw: dict[str, Any], fields: _Fields) -> Fp8CheckpointScheme:
    top_format = raw.get("format")
    groups = raw.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise fields.refuse("config_groups", groups, "it must name at least one group of quantized modules")
    for field in ("transform_config",):
        if raw.get(field):
            raise fields.refuse(field, raw[field], "weight transforms (rotations) are not applied by treadle")
    sparsity = raw.get("sparsity_config")
    if sparsity and (sparsity.get("format") not in (None, "dense") if isinstance(sparsity, dict) else True):
        raise fields.refuse("sparsity_config", sparsity, "sparse (compressed) weights are not read")
    layouts: dict[tuple[str, bool], str] = {}
    targets: list[str] = []
    for group_name, group in groups.items():
        prefix = f"config_groups.{group_name}"
        group_format = group.get("format") or top_format
        if group_format not in CT_FORMATS:
            field = f"{prefix}.format" if group.get("format") else "format"
            raise fields.refuse(
                field, group_format, f"only {' and '.join(CT_FORMATS)} store fp8 values as they are"
            )
        strategy = _weights(group.get("weights"), f"{prefix}.weights", fields)
        static = _activations(group.get("input_activations"), f"{prefix}.input_activations", fields)
        layouts[(strategy, static)] = group_name
        if group.get("output_activations") is not None:
            raise fields.refuse(
                f"{prefix}.output_activations",
                group["output_activations"],
                "output quantization is not supported",
            )
        group_targets = group.get("targets") or []
        if not group_targets or not all(isinstance(t, str) for t in group_targets):
            raise fields.refuse(f"{prefix}.targets", group_targets, "it must list the quantized modules")
        targets += group_targets
    if len(layouts) > 1:
        raise fields.refuse(
            "config_groups",
            sorted(groups),
            "its groups quantize differently (one scheme per "
            "checkpoint is supported: the same weight strategy and activation mode everywhere)",
        )
    ignore = raw.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise fields.refuse("ignore", ignore, "it must be a list of module names or 're:' patterns")
    ((strategy, static),) = layouts
    return Fp8CheckpointScheme(
        quant_method="compressed-tensors",
        weight_strategy=strategy,
        static_activations=static,
        targets=tuple(targets),
        ignore=tuple(ignore),
        has_kv_cache_scales=raw.get("kv_cache_scheme") is not None,
    )


def _check_fp8_args(args: dict[str, Any], field: str, fields: _Fields) -> None:
    if args.get("num_bits") != 8:
        raise fields.refuse(f"{field}.num_bits", args.get("num_bits"), "only 8-bit values are supported")
    if args.get("type", "int") != "float":
        raise fields.refuse(
            f"{field}.type",
            args.get("type", "int"),
            "only float (fp8 e4m3) values are supported, not integers (int8 W8A8 or weight-only)",
        )
    if args.get("symmetric", True) is not True:
        raise fields.refuse(
            f"{field}.symmetric", args["symmetric"], "asymmetric (zero-point) quantization is not supported"
        )
    for name in ("group_size", "block_structure", "actorder"):
        if args.get(name) is not None:
            raise fields.refuse(
                f"{field}.{name}",
                args[name],
                "group- or block-wise scales need a block-scaled GEMM, which treadle does not have",
            )


def _weights(args: Any, field: str, fields: _Fields) -> str:
    """The weight strategy ("channel" or "tensor") of a group's `weights` arguments."""
    if not isinstance(args, dict):
        raise fields.refuse(field, args, "every group must quantize its weights")
    _check_fp8_args(args, field, fields)
    strategy = args.get("strategy")
    if strategy not in ("channel", "tensor"):
        raise fields.refuse(
            f"{field}.strategy",
            strategy,
            "weight scales per channel or per tensor are "
            "supported; block- and group-wise ones need a block-scaled GEMM",
        )
    if args.get("dynamic"):
        raise fields.refuse(f"{field}.dynamic", args["dynamic"], "weights must be stored quantized")
    return str(strategy)


def _activations(args: Any, field: str, fields: _Fields) -> bool:
    """Whether a group's `input_activations` are static (one calibrated scale per projection)."""
    if args is None:
        logger.warning(
            "%s is null (fp8 weights only, W8A16); treadle's fp8 GEMM quantizes activations too: they are quantized "
            "dynamically per token",
            field,
        )
        return False
    if not isinstance(args, dict):
        raise fields.refuse(field, args, "it must be an object or null")
    _check_fp8_args(args, field, fields)
    strategy, dynamic = args.get("strategy"), args.get("dynamic")
    if strategy == "token" and dynamic is True:
        return False
    if strategy == "tensor" and dynamic is False:
        return True
    if strategy == "tensor" and dynamic is True:
        logger.info("%s: dynamic per-tensor activations run dynamically per token (at least as fine)", field)
        return False
    raise fields.refuse(
        f"{field}.strategy",
        f"{strategy} (dynamic {dynamic!r})",
        "activations must be dynamic per token, or static per tensor",
    )
