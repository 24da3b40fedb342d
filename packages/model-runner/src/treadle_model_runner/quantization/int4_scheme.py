"""What a 4-bit weight-only (W4A16) checkpoint's config.json says: `Int4CheckpointScheme`, parsed from its
`quantization_config` by `parse_int4_config` (scheme.py dispatches to it when `is_int4_config`). Three formats load,
with the fields vLLM reads:

AWQ (AutoAWQ "...-AWQ" models): `quant_method: "awq"`, `bits` (or `w_bit`) 4, `group_size` (or `q_group_size`; -1 =
one group per output channel), `zero_point: true`, `version: "gemm"` (or absent); `modules_to_not_convert` names
modules left unquantized by substring, as vLLM matches them. Tensors per projection: `qweight` int32 [k, n / 8]
(AWQ's interleaved nibble order), `qzeros` int32 [k / group, n / 8] (same order), `scales` fp16 [k / group, n].

GPTQ (AutoGPTQ / GPTQModel "...-GPTQ-Int4"): `quant_method: "gptq"`, `bits` 4, `group_size`, `desc_act` (act order:
each input row's group is `g_idx[row]`), `sym` (true: every zero point is 8 and `qzeros` is not read, as vLLM does),
`checkpoint_format` "gptq" (v1: `qzeros` store each zero point minus one, read back plus one) or "gptq_v2" (stored as
they are); `modules_in_block_to_quantize` (substrings, as vLLM) and `dynamic` rules that exclude modules ("-:" regexes;
per-module overrides of bits or group size are refused). Tensors: `qweight` int32 [k / 8, n], `qzeros` int32
[k / group, n / 8], `scales` fp16 [k / group, n], `g_idx` int32 [k] (read only with desc_act).

compressed-tensors "pack-quantized" (llm-compressor "...-W4A16" / "-W4A16-G128"): `config_groups` whose `weights` are
`{num_bits: 4, type: "int", symmetric, strategy: "group" | "channel", group_size, actorder}` and no
`input_activations`, with `targets` and `ignore` as for fp8 (scheme.py). Tensors: `weight_packed` int32 [n, k / 8],
`weight_scale` [n, k / group], `weight_zero_point` int32 [n / 8, k / group] when asymmetric (packed along n),
`weight_shape` [2], `weight_g_idx` [k] with actorder "group"; values stored signed plus 8.

Every other value (2/3/8 bits, AWQ gemv or exllama/marlin-only layouts, AWQ without zero points, a quantized lm_head,
4-bit activations, several different weight schemes in one checkpoint) is a ValueError naming config.json, the field
and its value. The formats' tensors become one layout at load (treadle_ir.ops.int4; quantization/int4_formats.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "INT4_METHODS",
    "Int4CheckpointScheme",
    "check_int4_request",
    "is_int4_config",
    "parse_int4_config",
]

INT4_METHODS = ("awq", "gptq", "compressed-tensors")
# --quantization values that name each method (vLLM's, Marlin kernel variants included)
METHOD_ALIASES = {"awq": ("awq", "awq_marlin"), "gptq": ("gptq", "gptq_marlin"),
                  "compressed-tensors": ("compressed-tensors",)}  # fmt: skip
_UNREAD_CT_ACTORDER = (None, False, "weight", "static")  # no g_idx in the files (a static reordering at most)


@dataclass(frozen=True)
class Int4CheckpointScheme:
    quant_method: str  # config.json's quant_method: "awq", "gptq" or "compressed-tensors"
    group_size: (
        int  # input rows sharing one scale and zero point; -1: the projection's whole input (per channel)
    )
    symmetric: bool  # every zero point is 8: no zero points are read
    act_order: bool  # each input row's group is read from the files (g_idx), not row // group_size
    zero_offset: int  # added to the stored zero points: 1 for GPTQ v1 files (they store zero - 1), else 0
    targets: tuple[str, ...]  # quantized modules: "Linear" (every projection), exact names, "re:" regexes
    ignore: tuple[str, ...]  # left in the model dtype: exact names (or their parents), "re:" regexes
    skip_substrings: tuple[str, ...]  # left in the model dtype when any is a substring (AWQ, GPTQ lists)
    only_substrings: (
        tuple[str, ...] | None
    )  # GPTQ modules_in_block_to_quantize: quantized only when one matches
    has_kv_cache_scales: bool  # compressed-tensors kv_cache_scheme: K/V cache scales the loader drops

    def quantizes(self, hf_module: str) -> bool:
        """Whether the checkpoint holds HF projection `hf_module` (e.g. model.layers.0.mlp.up_proj) in 4 bits; never
        the lm_head (treadle keeps it in the model dtype)."""
        if hf_module.rpartition(".")[2] == "lm_head" or not any(
            t == "Linear" or _matches(hf_module, t) for t in self.targets
        ):
            return False
        if any(_matches(hf_module, i) for i in self.ignore) or any(
            s in hf_module for s in self.skip_substrings
        ):
            return False
        return self.only_substrings is None or any(s in hf_module for s in self.only_substrings)

    def describe(self) -> str:
        groups = "per-channel" if self.group_size == -1 else f"group size {self.group_size}"
        zeros = "symmetric" if self.symmetric else "zero points"
        order = ", act order" if self.act_order else ""
        return f"4-bit checkpoint ({self.quant_method}: {groups}, {zeros}{order}; 16-bit activations)"


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.startswith(pattern + ".")


def is_int4_config(raw: dict[str, Any], method: object) -> bool:
    """Whether config.json's quantization_config (quant_method `method`, normalised) is a 4-bit weight-only one:
    AWQ and GPTQ always, compressed-tensors when a group's weights are 4-bit integers."""
    if method in ("awq", "gptq"):
        return True
    groups = raw.get("config_groups") if method == "compressed-tensors" else None
    if not isinstance(groups, dict):
        return False
    weights = [g.get("weights") for g in groups.values() if isinstance(g, dict)]
    return any(isinstance(w, dict) and w.get("type") == "int" and w.get("num_bits") == 4 for w in weights)


def check_int4_request(
    requested: str | None, scheme: Int4CheckpointScheme, model_cls: type, config_file: Path
) -> None:
    """ValueError unless `requested` (ModelConfig.quantization) may load this checkpoint as it is (None or a name of
    its method). Mixture-of-experts models load their 4-bit experts too (quantization/int4_experts.py)."""
    names = METHOD_ALIASES[scheme.quant_method]
    if requested is not None and requested not in names:
        raise ValueError(
            f"quantization {requested!r} was requested, but {config_file} describes a {scheme.describe()}; "
            f"leave --quantization unset (or pass {names[0]}) to load it as it is"
        )


class _Fields:
    """Reads the quantization_config's fields; `refuse` is the ValueError naming the file, the field and its value."""

    def __init__(self, raw: dict[str, Any], config_file: Path) -> None:
        self.raw, self.config_file = raw, config_file

    def refuse(self, field: str, value: object, why: str) -> ValueError:
        return ValueError(
            f"{self.config_file}: quantization_config.{field} is {value!r}: {why}; treadle loads 4-bit weight-only "
            "checkpoints (AWQ GEMM, GPTQ and compressed-tensors pack-quantized W4A16: 4-bit integers, grouped or "
            "per-channel scales, with or without zero points); serve the model's unquantized checkpoint instead"
        )

    def first(self, *names: str) -> tuple[str, Any]:
        """(field name, value) of the first of `names` set (the first name, None when none is)."""
        return next(((n, self.raw[n]) for n in names if self.raw.get(n) is not None), (names[0], None))

    def group_size(self, *names: str) -> int:
        field, value = self.first(*names)
        if not isinstance(value, int) or isinstance(value, bool) or (value <= 0 and value != -1):
            raise self.refuse(field, value, "it must be a positive number of input columns per group, or -1")
        return value

    def bits(self, *names: str) -> None:
        field, value = self.first(*names)
        if value != 4:
            raise self.refuse(field, value, "only 4-bit weights are supported")

    def names(self, field: str) -> tuple[str, ...]:
        value = self.raw.get(field) or []
        flat = (
            [n for v in value for n in (v if isinstance(v, list) else [v])]
            if isinstance(value, list)
            else None
        )
        if flat is None or not all(isinstance(n, str) for n in flat):
            raise self.refuse(field, value, "it must be a list of module names")
        return tuple(flat)

    def no_lm_head(self) -> None:
        if self.raw.get("lm_head"):
            raise self.refuse("lm_head", self.raw["lm_head"], "treadle keeps the lm_head in the model dtype")


def parse_int4_config(raw: dict[str, Any], method: str, config_file: Path) -> Int4CheckpointScheme:
    """The 4-bit layout config.json's `quantization_config` (quant_method `method`) describes; ValueError (naming
    `config_file`, the field and its value) for anything treadle cannot load as it is."""
    fields = _Fields(raw, config_file)
    if method == "awq":
        return _awq(fields)
    if method == "gptq":
        return _gptq(fields)
    return _compressed_tensors(fields)


def _scheme(method: str, group_size: int, **fields: Any) -> Int4CheckpointScheme:
    defaults: dict[str, Any] = {"symmetric": False, "act_order": False, "zero_offset": 0, "targets": ("Linear",),
                                "ignore": (), "skip_substrings": (), "only_substrings": None,
                                "has_kv_cache_scales": False}  # fmt: skip
    return Int4CheckpointScheme(method, group_size, **{**defaults, **fields})


def _awq(fields: _Fields) -> Int4CheckpointScheme:
    fields.bits("bits", "w_bit")
    group_size = fields.group_size("group_size", "q_group_size")
    version = fields.raw.get("version", "gemm")
    if not isinstance(version, str) or version.lower() != "gemm":
        raise fields.refuse(
            "version", version, "only AWQ's GEMM layout is read (gemv and exllama pack differently)"
        )
    if fields.raw.get("zero_point") is not True:
        raise fields.refuse(
            "zero_point", fields.raw.get("zero_point"), "AWQ checkpoints load with zero points"
        )
    fields.no_lm_head()
    return _scheme("awq", group_size, skip_substrings=fields.names("modules_to_not_convert"))


def _gptq(fields: _Fields) -> Int4CheckpointScheme:
    fields.bits("bits")
    group_size = fields.group_size("group_size")
    checkpoint_format = fields.raw.get("checkpoint_format", "gptq")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise fields.refuse(
            "checkpoint_format",
            checkpoint_format,
            "only the gptq and gptq_v2 layouts are read (not marlin's)",
        )
    if fields.raw.get("is_marlin_format"):
        raise fields.refuse("is_marlin_format", True, "Marlin's repacked layout is not read")
    for flag in ("desc_act", "sym"):
        if not isinstance(fields.raw.get(flag, False), bool):
            raise fields.refuse(flag, fields.raw[flag], "it must be true or false")
    fields.no_lm_head()
    dynamic = fields.raw.get("dynamic") or {}
    if not isinstance(dynamic, dict) or any(not str(k).startswith("-:") for k in dynamic):
        raise fields.refuse("dynamic", dynamic, "only '-:' rules (modules left unquantized) are supported")
    only = (
        fields.names("modules_in_block_to_quantize")
        if fields.raw.get("modules_in_block_to_quantize")
        else None
    )
    return _scheme(
        "gptq", group_size, symmetric=fields.raw.get("sym", True), zero_offset=1 if checkpoint_format == "gptq" else 0,
        act_order=fields.raw.get("desc_act", False) and group_size != -1, only_substrings=only,
        ignore=tuple(f"re:{k[2:]}" for k in dynamic),
    )  # fmt: skip


def _compressed_tensors(fields: _Fields) -> Int4CheckpointScheme:
    raw = fields.raw
    for field in ("transform_config",):
        if raw.get(field):
            raise fields.refuse(field, raw[field], "weight transforms (rotations) are not applied by treadle")
    sparsity = raw.get("sparsity_config")
    if sparsity and (sparsity.get("format") not in (None, "dense") if isinstance(sparsity, dict) else True):
        raise fields.refuse("sparsity_config", sparsity, "sparse (compressed) weights are not read")
    layouts: set[tuple[Any, ...]] = set()
    targets: list[str] = []
    for name, group in raw["config_groups"].items():
        prefix = f"config_groups.{name}"
        group_format = (group.get("format") if isinstance(group, dict) else None) or raw.get("format")
        if group_format != "pack-quantized":
            field = f"{prefix}.format" if isinstance(group, dict) and group.get("format") else "format"
            raise fields.refuse(
                field, group_format, "4-bit integer weights load from the pack-quantized format"
            )
        layouts.add(_ct_weights(group.get("weights"), f"{prefix}.weights", fields))
        for acts in ("input_activations", "output_activations"):
            if group.get(acts) is not None:
                raise fields.refuse(f"{prefix}.{acts}", group[acts], "activations stay 16-bit (W4A16 only)")
        group_targets = group.get("targets") or []
        if not group_targets or not all(isinstance(t, str) for t in group_targets):
            raise fields.refuse(f"{prefix}.targets", group_targets, "it must list the quantized modules")
        targets += group_targets
    if len(layouts) > 1:
        raise fields.refuse("config_groups", sorted(raw["config_groups"]), "its groups quantize differently (one "
                            "scheme per checkpoint: the same symmetry, strategy, group size and actorder)")  # fmt: skip
    ((symmetric, group_size, act_order),) = layouts
    ignore = raw.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise fields.refuse("ignore", ignore, "it must be a list of module names or 're:' patterns")
    return _scheme(
        "compressed-tensors", group_size, symmetric=symmetric, act_order=act_order, targets=tuple(targets),
        ignore=tuple(ignore), has_kv_cache_scales=raw.get("kv_cache_scheme") is not None,
    )  # fmt: skip


def _ct_weights(args: Any, field: str, fields: _Fields) -> tuple[bool, int, bool]:
    """(symmetric, group size, act order) of a compressed-tensors group's 4-bit `weights` arguments."""
    if not isinstance(args, dict):
        raise fields.refuse(field, args, "every group must quantize its weights")
    if args.get("num_bits") != 4 or args.get("type") != "int":
        value = f"{args.get('num_bits')}-bit {args.get('type')}"
        raise fields.refuse(f"{field}.num_bits", value, "a 4-bit checkpoint's groups all hold 4-bit integers")
    if args.get("dynamic"):
        raise fields.refuse(f"{field}.dynamic", args["dynamic"], "weights must be stored quantized")
    if not isinstance(args.get("symmetric", True), bool):
        raise fields.refuse(f"{field}.symmetric", args["symmetric"], "it must be true or false")
    strategy = args.get("strategy")
    group_size: Any = -1
    if strategy == "channel":
        pass
    elif strategy == "group":
        group_size = args.get("group_size")
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
            raise fields.refuse(
                f"{field}.group_size", group_size, "a group strategy needs a positive group size"
            )
    else:
        raise fields.refuse(f"{field}.strategy", strategy, "4-bit weights load per group or per channel")
    actorder = args.get("actorder")
    if actorder not in (*_UNREAD_CT_ACTORDER, "group", True, "dynamic"):
        raise fields.refuse(f"{field}.actorder", actorder, "it must be null, 'group', 'weight' or 'static'")
    act_order = actorder not in _UNREAD_CT_ACTORDER and group_size != -1
    return bool(args.get("symmetric", True)), group_size, act_order
