"""What `treadle serve` logs once it is up: the model, the KV capacity, speculative decoding when on (as the engine
reported it) and readiness (`startup_report`), then,
from a thread, the platform (device, dtype, quantization, attention backend) and each IR op's provider
(`platform_report`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("treadle.serve")


def startup_report(llm: Any, server_url: str, seconds: float) -> None:
    info = llm.model
    logger.info("Model: %s (%s) | max_model_len %d", info.name, info.path, info.max_model_len)
    logger.info("KV cache capacity: %s tokens", info.kv_capacity_tokens)
    speculation = info.runtime.get("speculative_decoding")
    if speculation:
        logger.info("Speculative decoding: %s", speculation)
    logger.info(
        "treadle is ready in %.1f s: serving %s at %s/v1 (OpenAI, Anthropic /v1/messages)",
        seconds,
        info.name,
        server_url,
    )


def platform_report(model_config: Any) -> None:
    """Device, dtype, attention backend and IR dispatch. Runs in a thread once the server is up: it imports
    torch, which the API process does not otherwise need, so it stays off the start-up path."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = model_config.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    backend = model_config.attention_backend
    if backend == "auto":
        backend = "triton" if device == "cuda" else "torch"
    logger.info("Platform: device %s | dtype %s | quantization %s | attention backend %s", device, dtype,
                quantization_label(model_config), backend)  # fmt: skip
    logger.info("IR dispatch: %s", ir_summary())


def quantization_label(model_config: Any) -> str:
    """What the start-up report says of quantization: the option asked for, else the checkpoint's own (config.json's
    quantization_config, which the engine loads as it is), else none."""
    if model_config.quantization:
        return str(model_config.quantization)
    try:
        quant = json.loads((Path(model_config.model) / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return "none"
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    return f"{method} checkpoint" if method else "none"


def ir_summary() -> str:
    """One line: which provider each IR op dispatches to on this machine (from treadle_ir.report())."""
    try:
        import treadle_ir
        import treadle_kernels  # noqa: F401  (registers the kernel providers the report lists)

        report = str(treadle_ir.report())
    except Exception as e:  # the summary is informative only
        return f"unavailable ({e})"
    picks = []
    for line in report.splitlines():
        if ": selected " in line and not line.startswith(" "):
            op, rest = line.split(": selected ", 1)
            picks.append(f"{op.strip()}={rest.split()[0]}")
    return ", ".join(picks) or report.splitlines()[0]
