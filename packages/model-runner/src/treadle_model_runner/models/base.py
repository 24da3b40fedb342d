"""What every causal LM in treadle offers the runner, and the shared HF-checkpoint loader.

A model is `forward(input_ids [T], positions [T]) -> hidden [T, hidden]` over a ragged batch of T tokens
(requests concatenated; attention finds request boundaries in the forward context), plus
`compute_logits(hidden [N, hidden]) -> [N, vocab]` applied by the runner only at the positions it samples.

Loading: HF tensors arrive by name. Names listed in `stacked_params` (e.g. `q_proj` -> shard "q" of
`qkv_proj`) are written into their slice of a stacked parameter; every other name must match a parameter of
the module tree, which mirrors HF's (`model.layers.N.self_attn...`). A checkpoint may hold a stacked parameter
whole (Phi-3's `qkv_proj` and `gate_up_proj`, shards in our order): that one tensor writes every shard. Afterwards every parameter must have been
written once, else ValueError names what is missing (as the checkpoint spells it: `q_proj.weight_scale`, not
the stacked `qkv_proj`'s shard) and where it looked, so a truncated checkpoint never runs with garbage.
fp8 checkpoints: a projection's `weight_scale` / `input_scale` go to `layers.fp8_weights.load_scale`; an fp8 tensor
loads only into an fp8 parameter and an fp8 parameter only from one (bytes copied, never cast), so a checkpoint whose
files disagree with its config.json's quantization_config is refused by tensor name. The files' spelling of the
weight scales is `weight_scale_name` (`weight_scale_inv` in block-wise quant_method fp8 checkpoints, set at
allocation by quantization/checkpoint.py): read as `weight_scale`, named so when missing, the other spelling refused.
4-bit checkpoints: the loader hands over each projection's tensors in treadle's layout (`packed_weight`, `group_scale`,
`group_zero`, `group_index`: quantization/int4_checkpoint.py), which go to `load_int4` (layers/linear_int4.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from treadle_model_runner.layers import fp8_weights
from treadle_model_runner.layers.attention import Attention
from treadle_model_runner.layers.linear import Linear, StackedLinear, checkpoint_shape, rank_part
from treadle_model_runner.layers.linear_int4 import INT4_TENSORS, load_int4
from treadle_model_runner.layers.vocab import ParallelLMHead

# HF tensor names that carry no weights treadle needs (buffers some exporters write)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
# an fp8 projection's scales (layers/fp8_weights.py), as the files spell them
FP8_SCALES = ("weight_scale", "weight_scale_inv", "input_scale")
WEIGHT_SCALE_NAMES = ("weight_scale", "weight_scale_inv")
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)


def check_fp8_dtype(hf_name: str, tensor: torch.Tensor, name: str, param: torch.Tensor) -> None:
    """ValueError unless fp8 meets fp8 of the same kind: a cast would drop (or invent) the scales."""
    if (tensor.dtype in _FP8_DTYPES or param.dtype in _FP8_DTYPES) and tensor.dtype != param.dtype:
        if param.dtype in _FP8_DTYPES:
            why = (
                "config.json's quantization_config makes this projection float8_e4m3fn, but the file holds it in "
                "another dtype (the files and config.json disagree)"
            )
        else:
            why = (
                "config.json's quantization_config leaves it unquantized (ignored, not targeted, or not a projection "
                "treadle quantizes, such as the lm_head); treadle cannot load it"
            )
        raise ValueError(
            f"checkpoint tensor {hf_name!r} is {tensor.dtype} and {name} is {param.dtype}: {why}"
        )


class CausalLM(nn.Module):
    # (stacked param name, HF name, shard) — "q_proj" in a tensor name loads shard "q" of "qkv_proj"
    stacked_params: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", "gate"),
        ("gate_up_proj", "up_proj", "up"),
    )
    config: Any
    lm_head: ParallelLMHead
    # routed experts (models/sparse_moe.py: FusedMoE layers besides the projections); quantization/plan.py says which
    # fp8 layouts they take
    has_experts: ClassVar[bool] = False
    # its attention layers carry per-head sinks (gpt-oss): only backends with `supports_sinks` can run it, which the
    # runner checks before loading any weight
    has_attention_sinks: ClassVar[bool] = False
    weight_scale_name: str = "weight_scale"  # the files' name of fp8 weight scales (module docstring)

    def attention_layers(self) -> list[Attention]:
        """The paged-attention layers, in decoder-layer order (index i is decoder layer i)."""
        layers = [m for m in self.modules() if isinstance(m, Attention)]
        assert [a.layer_idx for a in layers] == list(range(len(layers))), "attention layers out of order"
        return layers

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] (model dtype)."""
        return self.lm_head(hidden)

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def load_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], source: str = "the checkpoint"
    ) -> set[str]:
        """Copy HF-named tensors into this model; returns the parameter names written. `source` names where the
        tensors were read (a directory and its files) in the error for tensors the checkpoint lacks."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            if hf_name.endswith(_IGNORED_SUFFIXES) or (
                self.tie_word_embeddings and hf_name == "lm_head.weight"
            ):
                continue
            name, shard = hf_name, None
            for stacked, hf_part, shard_id in self.stacked_params:
                if f".{hf_part}." in hf_name:
                    name, shard = hf_name.replace(f".{hf_part}.", f".{stacked}."), shard_id
                    break
            owner_name, _, attr = name.rpartition(".")
            if attr in WEIGHT_SCALE_NAMES and f"{owner_name}.weight_scale" in params:
                if attr != self.weight_scale_name:
                    raise ValueError(
                        f"checkpoint tensor {hf_name!r}: config.json's quantization_config names this checkpoint's "
                        f"weight scales {self.weight_scale_name!r} (weight_scale_inv: quant_method fp8 with "
                        "weight_block_size; weight_scale otherwise): the files and config.json disagree"
                    )
                name, attr = f"{owner_name}.weight_scale", "weight_scale"
            if name not in params and attr == "input_scale" and f"{owner_name}.weight_scale" in params:
                raise ValueError(
                    f"checkpoint tensor {hf_name!r} is a static activation scale, but config.json's "
                    "quantization_config quantizes this projection's activations dynamically (per token): make "
                    "the activations static there, or remove the checkpoint's input_scale tensors"
                )
            if name not in params and attr in FP8_SCALES:
                raise ValueError(
                    f"checkpoint tensor {hf_name!r} is an fp8 scale, but config.json's quantization_config does not "
                    "make its projection fp8 (it is ignored or not targeted, or there is no quantization_config)"
                )
            if name not in params:
                raise ValueError(
                    f"checkpoint tensor {hf_name!r} has no parameter in {type(self).__name__}: "
                    "the checkpoint does not match this architecture"
                )
            param = params[name]
            check_fp8_dtype(hf_name, tensor, name, param)
            owner = modules[owner_name]
            if attr in FP8_SCALES or attr in INT4_TENSORS:
                assert isinstance(owner, Linear), (
                    f"{name}: fp8 scales and 4-bit tensors belong to projections"
                )
                if attr in INT4_TENSORS:
                    load_int4(owner, attr, shard, tensor, hf_name)
                else:
                    fp8_weights.load_scale(owner, attr, shard, tensor, hf_name)
            elif shard is not None:
                assert isinstance(owner, StackedLinear), f"{name} is not a stacked parameter"
                owner.load_shard(param, shard, tensor.to(param.dtype))
            else:
                expected = checkpoint_shape(owner, attr, param)
                if tuple(tensor.shape) != expected:
                    raise ValueError(
                        f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, the model expects "
                        f"{expected}: the checkpoint does not match config.json"
                    )
                with torch.no_grad():  # a tensor-parallel layer keeps this rank's slice (layers/linear.py)
                    param.data.copy_(rank_part(owner, attr, tensor))
            if shard is not None:
                loaded.add(f"{name}:{shard}")
            elif isinstance(owner, StackedLinear):
                # the checkpoint holds it stacked already (Phi-3's qkv_proj): every shard is written
                loaded.update(f"{name}:{s}" for s in owner.shard_sizes)
            else:
                loaded.add(name)
        self._check_complete(loaded, source)
        return loaded

    def checkpoint_name(self, name: str) -> str:
        """The checkpoint tensor a parameter, or a stacked parameter's shard (`name:shard`), is loaded from."""
        name, _, shard = name.partition(":")
        if name.endswith(".weight_scale"):
            name = name.removesuffix("weight_scale") + self.weight_scale_name
        for stacked, hf_part, shard_id in self.stacked_params if shard else ():
            if shard_id == shard and f".{stacked}." in name:
                return name.replace(f".{stacked}.", f".{hf_part}.")
        return name

    def _check_complete(self, loaded: set[str], source: str = "the checkpoint") -> None:
        expected: set[str] = set()
        modules = dict(self.named_modules())
        for name, _ in self.named_parameters():
            owner = modules[name.rsplit(".", 1)[0]] if "." in name else self
            if isinstance(owner, StackedLinear):
                expected.update(f"{name}:{shard}" for shard in owner.shard_sizes)
            else:
                expected.add(name)
        missing = sorted({self.checkpoint_name(name) for name in expected - loaded})
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            scales = [n for n in missing if n.rpartition(".")[2] in FP8_SCALES]
            hint = (
                " (config.json's quantization_config makes these projections fp8, so the checkpoint must hold "
                "their scales: re-export it, or fix quantization_config)"
                if scales
                else ""
            )
            if any(n.rpartition(".")[2] in INT4_TENSORS for n in missing):
                hint = (
                    " (treadle's names for a 4-bit projection's tensors: config.json's quantization_config makes "
                    "these projections 4-bit, so the checkpoint must hold their qweight / weight_packed, scales and "
                    "zero points: re-export it, or fix quantization_config)"
                )
            raise ValueError(
                f"{source} is missing {len(missing)} tensors {type(self).__name__} needs: {shown}{hint}"
            )
