"""What a started runner is running on, in words, for benchmark records and the start-up report: device, dtypes,
attention backend, CUDA-graph mode and whether the weights are real."""

from __future__ import annotations

import logging
import os
import platform
from typing import Any

import torch

logger = logging.getLogger(__name__)


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def graph_mode(runner: Any) -> str:
    """'decode sizes 1-256 (35 graphs); piecewise buckets 16-512 (6); one-request prefill buckets 16-512 (6)', or
    'off (<why>)'."""
    if runner.device.type != "cuda":
        return "off (not a CUDA device)"
    if runner.model_config.enforce_eager:
        return "off (enforce_eager)"
    if runner.graphs is None:
        return f"off (attention backend {runner.attn_backend.name!r})"
    decode = runner.graphs.sizes
    mode = f"decode sizes {decode[0]}-{decode[-1]} ({len(decode)} graphs)"
    if runner.piecewise is not None:
        buckets = runner.piecewise.sizes
        mode += f"; piecewise buckets {buckets[0]}-{buckets[-1]} ({len(buckets)})"
    if runner.prefill_graphs is not None:
        sizes = runner.prefill_graphs.sizes
        mode += f"; one-request prefill buckets {sizes[0]}-{sizes[-1]} ({len(sizes)})"
    verify = runner.verify_graphs
    if verify is not None:
        sizes = verify.graphs.sizes
        mode += f"; verify batches of <= {verify.query_len} tokens a request {sizes[0]}-{sizes[-1]} ({len(sizes)})"
    if runner.mixed_graphs is not None:
        sizes = runner.mixed_graphs.graphs.sizes
        mode += f"; mixed batches of {sizes[0]}-{sizes[-1]} tokens ({len(sizes)})"
    if runner.lora is not None:
        mode += "; each with and without the LoRA path"
    return mode


def runtime_summary(runner: Any) -> dict[str, str]:
    device = runner.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type} ({platform.machine()}, {os.cpu_count()} cores)"
    tp = runner.model_config.tensor_parallel_size
    ep = " + expert parallel" if runner.model_config.enable_expert_parallel else ""
    return {
        "device": name if tp == 1 else f"{name} x {tp} (tensor parallel{ep})",
        "torch": str(torch.__version__),  # a str subclass msgspec does not encode
        "dtype": _dtype(runner.dtype),
        "kv_cache_dtype": _dtype(runner.kv_cache_dtype),
        "attention_backend": str(runner.attn_backend.name),
        "cuda_graphs": graph_mode(runner),
        "weights": "dummy (random)" if runner.model_config.load_format == "dummy" else "loaded",
        "quantization": runner.quantization.describe() if runner.quantization is not None else "none",
    }


def log_dispatch_report(model: torch.nn.Module) -> None:
    """Log, once at start-up, which provider each IR op dispatches to here (and the MoE kernel choice)."""
    import treadle_ir
    import treadle_moe
    import treadle_moe.oracle

    logger.info("IR dispatch report:\n%s", treadle_ir.report())
    if any(isinstance(m, treadle_moe.FusedMoE) for m in model.modules()):
        logger.info("MoE kernel report:\n%s", treadle_moe.oracle.report())


def log_expert_parallel(model: torch.nn.Module, enabled: bool, tp_size: int) -> None:
    """Log, once at start-up, what enable_expert_parallel did: which experts this rank holds, or why nothing."""
    import treadle_moe

    if not enabled:
        return
    layers = [m for m in model.modules() if isinstance(m, treadle_moe.FusedMoE)]
    if tp_size == 1 or not layers:
        why = "one device" if tp_size == 1 else "the model has no routed experts"
        logger.info("expert parallelism: no effect (%s)", why)
        return
    placement = layers[0].placement
    last = placement.first + placement.num_local - 1
    logger.info("expert parallelism: this rank holds whole experts %d-%d of %d in each of %d MoE layers",
                placement.first, last, placement.num_experts, len(layers))  # fmt: skip
