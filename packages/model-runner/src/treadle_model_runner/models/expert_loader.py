"""Loading the routed experts' tensors of a checkpoint into the FusedMoE layers of a sparse MoE model.

Two HF layouts reach a MoE model's `load_weights` (models/sparse_moe.py):
- per expert (what `save_pretrained` and the fp8 exporters write): `...experts.{e}.{proj}.weight`, with the
  projection names of the architecture (`gate_proj/up_proj/down_proj`, Mixtral `w1/w3/w2`), each copied into its
  expert's slice of `w13_weight` [E, 2N, K] (gate rows, then up rows) or `w2_weight` [E, K, N]; an fp8 checkpoint
  adds `...experts.{e}.{proj}.weight_scale_inv` (block-wise, quant_method fp8) or `.weight_scale`, which go to the
  expert's slice of `w13_weight_scale` / `w2_weight_scale` (this rank's blocks or rows of it:
  `ParallelFusedMoE.take_expert_scale`); a static one (per-tensor activations) adds `...experts.{e}.{proj}.input_scale`
  (one value, the same on every rank), to the expert's entry of `w13_input_scale` (gate's, up's) / `w2_input_scale`;
  a 4-bit checkpoint's expert projections arrive in treadle's 4-bit layout
  (`...experts.{e}.{proj}.packed_weight`, `group_scale`, `group_zero`, `group_index`: int4_checkpoint.py repacks
  them) and go to quantization/int4_experts.py's `load_expert` (this rank's part, into the stacked layout);
- fused (transformers' in-memory layout): `...experts.gate_up_proj` [E, 2N, K] and `...experts.down_proj`
  [E, K, N], copied whole (model-dtype experts); for MXFP4 experts kept 4-bit (gpt-oss) the same names carry one
  uint8 tensor of blocks and scales (quantization/mxfp4_experts.py's `pair`), this rank's part copied in.
Checkpoint module prefixes the architecture renames (Mixtral's `block_sparse_moe.` -> `mlp.`) are rewritten first.
An fp8 tensor loads only into fp8 experts and the reverse (bytes copied, never cast), so files that disagree with
config.json's quantization_config fail by tensor name, as the projections do (models/base.py).
Invariant (`check_complete`): every expert's gate, up and down matrix, and with fp8 experts each one's scales, is
written before the model runs (with static activations its input scales too, then folded at load:
`FusedMoE.fp8_scales`); otherwise ValueError names the missing ones (the weights as
`model.layers.3.mlp.experts.w13_weight[expert 5, up]`, the scales as the checkpoint spells them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch

from treadle_model_runner.layers.linear import checkpoint_shape, rank_part
from treadle_model_runner.models.base import check_fp8_dtype
from treadle_model_runner.quantization.int4_experts import load_expert
from treadle_model_runner.quantization.mxfp4_experts import load_pair
from treadle_moe import FusedMoE

if TYPE_CHECKING:
    from treadle_model_runner.models.sparse_moe import MoeCausalLM

__all__ = ["ExpertLoader"]

SHARD_NAMES = {"w1": "gate", "w3": "up", "w2": "down"}
_PER_EXPERT = re.compile(
    r"^(?P<moe>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>[A-Za-z0-9_]+)\."
    r"(?P<attr>weight|weight_scale|weight_scale_inv|input_scale|packed_weight|group_scale|group_zero|group_index)$"
)
_INT4_ATTRS = ("packed_weight", "group_scale", "group_zero", "group_index")
# FusedMoE parameters loaded as dense tensors (CausalLM.load_weights), not expert by expert
_DENSE_PARAMS = ("e_score_correction_bias", "w13_bias", "w2_bias")
_FUSED = re.compile(r"^(?P<moe>.+\.experts)\.(?P<proj>gate_up_proj|down_proj)(?:\.weight)?$")


class ExpertLoader:
    """Consumes a checkpoint's expert tensors for `model` (`filter`), remembering what it wrote (`check_complete`)."""

    def __init__(self, model: MoeCausalLM) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        # (FusedMoE name, expert, shard, "weight" | "scale" | "input_scale" | a 4-bit part)
        self.loaded: set[tuple[str, int, str, str]] = set()

    def filter(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Copy expert tensors into the FusedMoE layers; yield every other tensor (renamed)."""
        for hf_name, tensor in weights:
            name = hf_name
            for old, new in self.model.checkpoint_renames:
                name = name.replace(old, new)
            per_expert, fused = _PER_EXPERT.match(name), _FUSED.match(name)
            match = per_expert or fused
            moe = self.modules.get(match["moe"]) if match else None
            if not isinstance(moe, FusedMoE):
                yield name, tensor
            elif per_expert is not None:
                self._load_per_expert(moe, per_expert, hf_name, tensor)
            else:
                assert fused is not None
                self._load_fused(moe, fused, hf_name, tensor)

    def _load_per_expert(
        self, moe: FusedMoE, match: re.Match[str], hf_name: str, tensor: torch.Tensor
    ) -> None:
        shard = self.model.expert_proj_names.get(match["proj"])
        if shard is None:
            raise ValueError(
                f"checkpoint tensor {hf_name!r}: expert projection {match['proj']!r} is unknown to "
                f"{type(self.model).__name__}; expected one of {', '.join(self.model.expert_proj_names)}"
            )
        expert, attr = int(match["expert"]), match["attr"]
        if attr in _INT4_ATTRS:
            if moe.int4_layout is None:
                raise ValueError(
                    f"checkpoint tensor {hf_name!r} is part of a 4-bit expert, but treadle's "
                    f"{type(self.model).__name__} experts of {match['moe']} are not 4-bit (config.json's "
                    "quantization_config decides): the files and config.json disagree"
                )
            load_expert(moe, shard, attr, expert, tensor, hf_name)
            self.loaded.add((match["moe"], expert, shard, "weight" if attr == "packed_weight" else attr))
            return
        layout = moe.fp8_layout
        if attr == "input_scale" and layout is not None and layout.static_activations:
            param = moe.w2_input_scale if shard == "w2" else moe.w13_input_scale
            assert param is not None, "static fp8 experts have input scales"
            moe.weight_loader(param, tensor, hf_name, shard, expert)
            self.loaded.add((match["moe"], expert, shard, "input_scale"))
            return
        if attr == "weight":
            param = moe.w2_weight if shard == "w2" else moe.w13_weight
            check_fp8_dtype(hf_name, tensor, f"{match['moe']}.{_param_name(shard)}", param)
            take = getattr(moe, "take_expert_shard", None)
            part = take(shard, tensor, hf_name) if take is not None else tensor
            moe.weight_loader(param, part.to(param.dtype), hf_name, shard, expert)
            self.loaded.add((match["moe"], expert, shard, "weight"))
            return
        if attr == "input_scale" or moe.fp8_layout is None:
            what = "a static activation scale" if attr == "input_scale" else "an fp8 scale"
            raise ValueError(
                f"checkpoint tensor {hf_name!r} is {what}, but treadle's {type(self.model).__name__} experts "
                f"{'quantize their activations dynamically' if moe.fp8_layout else 'are not fp8'} (config.json's "
                "quantization_config decides): the files and config.json disagree"
            )
        if attr != self.model.weight_scale_name:
            raise ValueError(
                f"checkpoint tensor {hf_name!r}: config.json's quantization_config names this checkpoint's weight "
                f"scales {self.model.weight_scale_name!r} (weight_scale_inv: quant_method fp8 with "
                "weight_block_size; weight_scale otherwise): the files and config.json disagree"
            )
        scale = moe.w2_weight_scale if shard == "w2" else moe.w13_weight_scale
        assert scale is not None, "fp8 experts have scales"
        take_scale = getattr(moe, "take_expert_scale", None)
        part = take_scale(shard, tensor, hf_name) if take_scale is not None else tensor
        moe.weight_loader(scale, part, hf_name, shard, expert)
        self.loaded.add((match["moe"], expert, shard, "scale"))

    def _load_fused(self, moe: FusedMoE, match: re.Match[str], hf_name: str, tensor: torch.Tensor) -> None:
        name = "w13_weight" if match["proj"] == "gate_up_proj" else "w2_weight"
        shards = ("w1", "w3") if match["proj"] == "gate_up_proj" else ("w2",)
        if moe.mxfp4_layout is not None:  # gpt-oss's MXFP4 experts kept 4-bit (quantization/mxfp4_experts.py)
            load_pair(moe, "w13" if match["proj"] == "gate_up_proj" else "w2", tensor, hf_name)
            self.loaded.update((match["moe"], e, s, "weight") for e in range(moe.num_experts) for s in shards)
            return
        param = getattr(moe, name)
        check_fp8_dtype(hf_name, tensor, f"{match['moe']}.{name}", param)
        if moe.fp8_layout is not None:
            raise ValueError(
                f"checkpoint tensor {hf_name!r} holds every expert fused; fp8 experts load from one matrix per "
                "expert with its scales (experts.{e}.gate_proj.weight and its weight_scale_inv, ...)"
            )
        weight = tensor.to(param.dtype)
        full = checkpoint_shape(moe, name, param)
        if tuple(weight.shape) != full:
            raise ValueError(
                f"checkpoint tensor {hf_name!r} has shape {tuple(weight.shape)}, the model expects {full} "
                "([experts, 2 * moe_intermediate, hidden] for gate_up_proj, [experts, hidden, moe_intermediate] "
                "for down_proj): the checkpoint does not match config.json"
            )
        param.data.copy_(rank_part(moe, name, weight))
        self.loaded.update((match["moe"], e, s, "weight") for e in range(moe.num_experts) for s in shards)

    def loaded_names(self) -> set[str]:
        return {f"{name}[{expert}:{shard}:{kind}]" for name, expert, shard, kind in self.loaded}

    def check_complete(self, source: str = "the checkpoint") -> set[str]:
        """ValueError naming the missing expert tensors (module docstring); else the FusedMoE parameter names, which
        count as loaded for the dense check."""
        missing: list[str] = []
        covered: set[str] = set()
        for module_name, module in self.modules.items():
            if not isinstance(module, FusedMoE):
                continue
            for shard in ("w1", "w3", "w2"):
                for e in range(module.num_experts):
                    if (module_name, e, shard, "weight") not in self.loaded:
                        missing.append(
                            f"{module_name}.{_param_name(shard)}[expert {e}, {SHARD_NAMES[shard]}]"
                        )
                    layout = module.fp8_layout
                    if layout is not None and (module_name, e, shard, "scale") not in self.loaded:
                        missing.append(self._scale_name(module_name, e, shard))
                    for attr in _int4_parts(module):
                        if (module_name, e, shard, attr) not in self.loaded:
                            missing.append(
                                self._scale_name(module_name, e, shard).rpartition(".")[0] + f".{attr}"
                            )
                    if (
                        layout is not None
                        and layout.static_activations
                        and ((module_name, e, shard, "input_scale") not in self.loaded)
                    ):
                        missing.append(self._scale_name(module_name, e, shard, "input_scale"))
            # the router's correction bias (GLM-4.5) and the experts' biases (gpt-oss) load as dense tensors: the
            # dense check names them if missing
            names = (name for name, _ in module.named_parameters(recurse=False))
            covered |= {f"{module_name}.{name}" for name in names if name not in _DENSE_PARAMS}
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise ValueError(
                f"{source} is missing {len(missing)} expert tensors for {type(self.model).__name__}: {shown}"
            )
        for module in self.modules.values():
            if isinstance(module, FusedMoE) and module.fp8_layout is not None:
                module.fp8_scales()  # folds static input scales now: at load, never inside a CUDA-graph capture
        return covered

    def _scale_name(self, module_name: str, expert: int, shard: str, attr: str | None = None) -> str:
        proj = next(p for p, s in self.model.expert_proj_names.items() if s == shard)
        prefix = self.model.checkpoint_name(module_name)
        return f"{prefix}.{expert}.{proj}.{attr or self.model.weight_scale_name}"


def _int4_parts(moe: FusedMoE) -> tuple[str, ...]:
    """The tensors besides packed_weight that each projection of 4-bit experts loads."""
    layout = moe.int4_layout
    if layout is None:
        return ()
    return (
        ("group_scale",)
        + (("group_zero",) if layout.has_zeros else ())
        + (("group_index",) if layout.act_order else ())
    )


def _param_name(shard: str) -> str:
    return "w2_weight" if shard == "w2" else "w13_weight"
