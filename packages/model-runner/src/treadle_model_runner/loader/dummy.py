"""Dummy weights: deterministic random parameters from a config alone, for benchmarks and tests.

Theory: a benchmark needs the shapes and the arithmetic of a real model, not its knowledge. Matrices are
drawn from N(0, std²) (std 0.02 keeps activations and logits in a realistic range through dozens of
layers), norm weights are 1 and biases 0, so the network neither explodes nor collapses.

A 4-bit checkpoint's projections (layers/linear_int4.py) draw their own codes, scales and zero points; MXFP4 experts
kept 4-bit (gpt-oss on CUDA) are random model-dtype experts quantized at load (quantization/mxfp4_experts.py).

Invariants: each parameter's values depend only on (seed, parameter name, shape, device type), never on
the order parameters are visited, so a model whose layers are built or stacked differently still gets the
same values for the same names; generation happens on the parameter's own device (fast on GPU, no host
copy). A tensor-parallel layer's parameter is drawn at its full (one-rank) shape and sliced (`take_shard`), so
every rank's slices join to the one-rank model's values.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import Any

import torch

from treadle_model_runner.layers.linear import checkpoint_shape, rank_part
from treadle_model_runner.layers.linear_int4 import INT4_TENSORS, fill_dummy_int4
from treadle_model_runner.loader.weights import CONFIG_FILE
from treadle_model_runner.quantization.int4_experts import fill_dummy_experts
from treadle_model_runner.quantization.mxfp4_experts import fill_dummy_experts as fill_dummy_mxfp4
from treadle_model_runner.quantization.mxfp4_experts import log_experts
from treadle_moe import FusedMoE

logger = logging.getLogger(__name__)

DUMMY_STD = 0.02


def _is_norm(name: str) -> bool:
    last = name.rsplit(".", 2)
    return any("norm" in part for part in last[-2:]) or name.endswith("ln_f.weight")


@torch.no_grad()
def load_dummy_weights(model: torch.nn.Module, seed: int = 0, std: float = DUMMY_STD) -> None:
    """Fill every parameter of ``model`` in place: matrices ~ N(0, std²), norm weights 1, biases 0."""
    generators: dict[torch.device, torch.Generator] = {}
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        if param.device.type == "meta":
            raise ValueError(
                f"parameter {name} is on the meta device; materialise the model before load_dummy_weights"
            )
        owner_name, _, attr = name.rpartition(".")
        owner = modules[owner_name]
        if (
            isinstance(owner, FusedMoE) and owner.int4_layout is not None
        ):  # 4-bit experts: all tensors at once
            if attr == "w13_weight":
                fill_dummy_experts(owner, owner_name, seed, std)
            continue
        if isinstance(owner, FusedMoE) and owner.mxfp4_layout is not None and not name.endswith("bias"):
            if attr == "w13_weight":  # MXFP4 experts (gpt-oss): random experts quantized, one at a time
                fill_dummy_mxfp4(owner, owner_name, seed, std)
            continue
        if attr in INT4_TENSORS:  # a 4-bit projection fills all of its tensors at once
            if attr == "packed_weight":
                fill_dummy_int4(modules[owner_name], owner_name, seed, std)  # type: ignore[arg-type]
            continue
        if name.endswith("bias"):
            param.zero_()
        elif _is_norm(name) and param.dim() == 1:
            param.fill_(1.0)
        else:
            gen = generators.get(param.device)
            if gen is None:
                gen = generators[param.device] = torch.Generator(device=param.device)
            gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63))
            owner = modules[owner_name]
            full_shape = checkpoint_shape(owner, attr, param)
            if param.dtype.is_floating_point and full_shape != tuple(param.shape):  # a tensor-parallel slice
                param.copy_(
                    rank_part(owner, attr, param.new_empty(full_shape).normal_(0.0, std, generator=gen))
                )
            elif param.dtype.is_floating_point:
                param.normal_(0.0, std, generator=gen)
            else:
                raise ValueError(
                    f"parameter {name} has dtype {param.dtype}; dummy weights fill floating point only"
                )
    logger.info("filled %s with dummy weights (seed %d, std %g)", type(model).__name__, seed, std)
    if any(isinstance(m, FusedMoE) and m.mxfp4_layout is not None for m in modules.values()):
        log_experts(model, "dummy weights, random experts quantized at load")


def make_dummy_model_dir(config: Any, out_dir: Path) -> Path:
    """Write an HF-format directory holding only ``config.json``, for ``load_format='dummy'``.

    ``config`` is a transformers ``PretrainedConfig``, a dict of config fields, or the path of a
    config.json (e.g. ``benchmarks/configs/llama-3.1-8b/config.json``). Returns ``out_dir``.
    """
    if isinstance(config, (str, Path)):
        config_path = Path(config)
        if config_path.is_dir():
            config_path = config_path / CONFIG_FILE
        if not config_path.is_file():
            raise ValueError(f"config file {config_path} does not exist")
        try:
            data = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {config_path} is not valid JSON ({exc})") from exc
    elif isinstance(config, dict):
        data = dict(config)
    elif hasattr(config, "to_dict"):
        data = config.to_dict()
    else:
        raise ValueError(
            f"config must be a PretrainedConfig, a dict or a config.json path, got {type(config)}"
        )
    if "model_type" not in data:
        raise ValueError("the config has no 'model_type'; transformers cannot tell which model it describes")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n")
    return out_dir
