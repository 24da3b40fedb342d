"""Reading a compressed-tensors `quantization_config` (llm-compressor's FP8, FP8-dynamic and FP8-block models):
`read_compressed_tensors` returns the one layout its config groups share, or raises the ValueError naming the field.

Loadable: `format` "float-quantized" (or "naive-quantized", the same layout for fp8); config groups whose `weights`
are `{num_bits: 8, type: "float", symmetric: true, dynamic: false}` with `strategy` "channel", "tensor", or "block"
with `block_structure: [block_n, block_k]`; whose `input_activations` are dynamic per token (`strategy: "token"`),
static per tensor (`strategy: "tensor", dynamic: false`), or, for block weights, dynamic per token group
(`strategy: "group", group_size: block_k`, llm-compressor's FP8_BLOCK); no `output_activations`. Looser activations
run finer, logged: weight-only groups (no `input_activations`) and dynamic per-tensor ones run per token (per token
group with block weights, as do per-token ones there: the block-scaled GEMM takes one scale per K block).
Every group must quantize the same way (one scheme per checkpoint).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from treadle_model_runner.quantization.scheme import ConfigFields

logger = logging.getLogger(__name__)

__all__ = ["CompressedTensorsLayout", "block_size", "read_compressed_tensors"]

CT_FORMATS = (
    "float-quantized",
    "naive-quantized",
)  # compressed-tensors formats storing fp8 values as they are


class CompressedTensorsLayout(NamedTuple):
    weight_strategy: str  # "channel", "tensor" or "block"
    weight_block: tuple[int, int] | None  # (block_n, block_k) of "block"; else None
    block_field: str  # where config.json gives weight_block ("" without one)
    static_activations: bool  # one calibrated input scale per projection
    targets: tuple[str, ...]  # every group's targets
    ignore: tuple[str, ...]  # the `ignore` list


def read_compressed_tensors(raw: dict[str, Any], fields: ConfigFields) -> CompressedTensorsLayout:
    top_format = raw.get("format")
    groups = raw.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise fields.refuse("config_groups", groups, "it must name at least one group of quantized modules")
    if raw.get("transform_config"):
        raise fields.refuse(
            "transform_config",
            raw["transform_config"],
            "weight transforms (rotations) are not applied by treadle",
        )
    sparsity = raw.get("sparsity_config")
    if sparsity and (sparsity.get("format") not in (None, "dense") if isinstance(sparsity, dict) else True):
        raise fields.refuse("sparsity_config", sparsity, "sparse (compressed) weights are not read")
    layouts: dict[tuple[str, tuple[int, int] | None, bool], str] = {}
    targets: list[str] = []
    for group_name, group in groups.items():
        prefix = f"config_groups.{group_name}"
        group_format = group.get("format") or top_format
        if group_format not in CT_FORMATS:
            field = f"{prefix}.format" if group.get("format") else "format"
            raise fields.refuse(
                field, group_format, f"only {' and '.join(CT_FORMATS)} store fp8 values as they are"
            )
        strategy, block = _weights(group.get("weights"), f"{prefix}.weights", fields)
        static = _activations(group.get("input_activations"), f"{prefix}.input_activations", block, fields)
        layouts[(strategy, block, static)] = group_name
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
            "its groups quantize differently (one scheme per checkpoint is supported: the same weight "
            "strategy, block size and activation mode everywhere)",
        )
    ignore = raw.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise fields.refuse("ignore", ignore, "it must be a list of module names or 're:' patterns")
    ((strategy, block, static), group_name), *_ = layouts.items()
    block_field = f"config_groups.{group_name}.weights.block_structure" if block else ""
    return CompressedTensorsLayout(strategy, block, block_field, static, tuple(targets), tuple(ignore))


def _check_fp8_args(args: dict[str, Any], field: str, fields: ConfigFields, allowed: tuple[str, ...]) -> None:
    """8-bit symmetric float arguments; of group_size / block_structure / actorder only `allowed` may be set."""
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
        if args.get(name) is not None and name not in allowed:
            raise fields.refuse(
                f"{field}.{name}",
                args[name],
                "group-wise weight scales (one per row and group of inputs) and activation ordering are not "
                "supported; block-wise weights are (strategy 'block' with block_structure [block_n, block_k])",
            )


def block_size(value: Any, field: str, fields: ConfigFields) -> tuple[int, int]:
    """[block_n, block_k] as two positive integers, else the ValueError naming `field`."""
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise fields.refuse(field, value, "it must be [block_n, block_k], two positive integers")
    return int(value[0]), int(value[1])


def _weights(args: Any, field: str, fields: ConfigFields) -> tuple[str, tuple[int, int] | None]:
    """The weight strategy of a group's `weights` arguments, and its block size when "block"."""
    if not isinstance(args, dict):
        raise fields.refuse(field, args, "every group must quantize its weights")
    strategy = args.get("strategy")
    _check_fp8_args(args, field, fields, ("block_structure",) if strategy == "block" else ())
    if strategy not in ("channel", "tensor", "block"):
        raise fields.refuse(
            f"{field}.strategy",
            strategy,
            "weight scales per channel, per tensor or per block are supported; group-wise ones are not",
        )
    if args.get("dynamic"):
        raise fields.refuse(f"{field}.dynamic", args["dynamic"], "weights must be stored quantized")
    if strategy != "block":
        return str(strategy), None
    return "block", block_size(args.get("block_structure"), f"{field}.block_structure", fields)


def _activations(args: Any, field: str, block: tuple[int, int] | None, fields: ConfigFields) -> bool:
    """Whether a group's `input_activations` are static (one calibrated scale per projection)."""
    finer = "per token group" if block else "per token"
    if args is None:
        logger.warning(
            "%s is null (fp8 weights only, W8A16); treadle's fp8 GEMM quantizes activations too: they are quantized "
            "dynamically %s", field, finer,
        )  # fmt: skip
        return False
    if not isinstance(args, dict):
        raise fields.refuse(field, args, "it must be an object or null")
    strategy, dynamic = args.get("strategy"), args.get("dynamic")
    _check_fp8_args(args, field, fields, ("group_size",) if block and strategy == "group" else ())
    if block and strategy == "group" and dynamic is True:
        if args.get("group_size") != block[1]:
            raise fields.refuse(
                f"{field}.group_size",
                args.get("group_size"),
                f"per-group activations must use the weights' block_k ({block[1]}), one scale per K block",
            )
        return False
    if strategy == "token" and dynamic is True:
        if block:
            logger.info("%s: dynamic per-token activations run per token group (block-scaled GEMM)", field)
        return False
    if strategy == "tensor" and dynamic is False and not block:
        return True
    if strategy == "tensor" and dynamic is True:
        logger.info("%s: dynamic per-tensor activations run dynamically %s (at least as fine)", field, finer)
        return False
    allowed = (
        "dynamic per token group (group_size block_k) or per token, for block-wise weights"
        if block
        else "dynamic per token, or static per tensor"
    )
    raise fields.refuse(
        f"{field}.strategy", f"{strategy} (dynamic {dynamic!r})", f"activations must be {allowed}"
    )
