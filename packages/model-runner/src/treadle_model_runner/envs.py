"""Environment variables read by treadle_model_runner, declared once, typed, read lazily.

Every variable is read through a function at the moment it is needed, so tests may set it with
``monkeypatch.setenv`` after import. A malformed value raises ``ValueError`` naming the variable, the value
and the accepted forms. No other module of treadle_model_runner reads ``os.environ``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["TREADLE_CACHE_DIR", "TREADLE_CONVERSION_PROGRESS", "TREADLE_PIECEWISE_MAX_TOKENS", "parse_bool"]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def parse_bool(name: str, raw: str) -> bool:
    """Parse a boolean environment value; raise naming ``name`` when it is not a boolean."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"environment variable {name}={raw!r} is not a boolean; use one of 1/0, true/false, yes/no, on/off"
    )


def _absolute_dir(name: str, raw: str) -> Path:
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise ValueError(
            f"environment variable {name}={raw!r} is not an absolute path; give an absolute directory"
        )
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"environment variable {name}={raw!r} names a file, not a directory; point it at a directory"
        )
    return path


def _whole_number(name: str, default: str, unit: str, zero: str) -> int:
    """A non-negative integer variable; ValueError naming it, its value, the unit and what 0 means."""
    raw = os.environ.get(name, default).strip()
    if not raw.isdigit():
        raise ValueError(f"environment variable {name}={raw!r} is not a whole number of {unit} ({zero})")
    return int(raw)


def TREADLE_CACHE_DIR() -> Path:
    """Where treadle keeps converted models: ``TREADLE_CACHE_DIR``, else ``$XDG_CACHE_HOME/treadle``,
    else ``~/.cache/treadle``. The directory need not exist yet."""
    raw = os.environ.get("TREADLE_CACHE_DIR", "")
    if raw:
        return _absolute_dir("TREADLE_CACHE_DIR", raw)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg:
        return _absolute_dir("XDG_CACHE_HOME", xdg) / "treadle"
    return Path.home() / ".cache" / "treadle"


def TREADLE_CONVERSION_PROGRESS() -> bool:
    """``0`` hides the progress bar shown on stderr while a GGUF file is converted (default ``1``)."""
    return parse_bool("TREADLE_CONVERSION_PROGRESS", os.environ.get("TREADLE_CONVERSION_PROGRESS", "1"))


def TREADLE_PIECEWISE_MAX_TOKENS() -> int:
    """Largest step (in tokens) that is not decode-only and still runs as piecewise CUDA graphs (default 512;
    0 turns them off). Steps are padded up to a power-of-two bucket from 16; each bucket keeps its attention
    inputs and outputs alive (runner/piecewise.py)."""
    return _whole_number("TREADLE_PIECEWISE_MAX_TOKENS", "512", "tokens", "0 turns piecewise CUDA graphs off")


def TREADLE_PREFILL_GRAPHS() -> bool:
    """``1`` (default) captures full CUDA graphs for steps that prefill one request (runner/prefill_graphs.py) where
    the attention backend allows it; ``0`` runs those steps as piecewise graphs, like any other prefill."""
    return parse_bool("TREADLE_PREFILL_GRAPHS", os.environ.get("TREADLE_PREFILL_GRAPHS", "1"))


def TREADLE_VERIFY_GRAPHS() -> bool:
    """``1`` (default) captures full CUDA graphs for steps whose requests each schedule at most 1 + k tokens under
    speculative decoding (runner/batch_graphs.py) where the attention backend allows it; ``0`` runs those steps
    as piecewise graphs around eager attention."""
    return parse_bool("TREADLE_VERIFY_GRAPHS", os.environ.get("TREADLE_VERIFY_GRAPHS", "1"))


def TREADLE_MIXED_GRAPHS() -> bool:
    """``1`` (default) captures full CUDA graphs for steps of several requests that are not decode-only, up to the
    piecewise token buckets (runner/batch_graphs.py), where the attention backend allows it, instead of piecewise
    graphs; ``0`` keeps the piecewise graphs around eager attention for them."""
    return parse_bool("TREADLE_MIXED_GRAPHS", os.environ.get("TREADLE_MIXED_GRAPHS", "1"))


def TREADLE_FUSED_GUMBEL() -> bool:
    """``1`` (default) samples a batch that only samples (every row random; no mask, bias, penalty, truncation or
    logprobs) on CUDA with one Triton pass over the logits (``treadle_kernels.ops.gumbel``) instead of seven torch
    passes; ``0`` keeps the torch passes. H200, 1000 x 1024/1024 at 512 sequences with an fp8 cache: 11,676 output
    tok/s against 11,489 / 11,507 without, same machine (benchmarks/results/gpu-power-h200-ef1a60f)."""
    return parse_bool("TREADLE_FUSED_GUMBEL", os.environ.get("TREADLE_FUSED_GUMBEL", "1"))


def TREADLE_TP_ONE_SHOT_MAX_BYTES() -> int:
    """Tensor parallelism on CUDA: all-reduces of up to this many bytes run as one symmetric-memory kernel rather
    than through NCCL (default 2097152, 2 MiB: a decode step of 256 sequences of an 8B model; 0 keeps NCCL for all;
    symm_all_reduce.py)."""
    return _whole_number(
        "TREADLE_TP_ONE_SHOT_MAX_BYTES", "2097152", "bytes", "0 keeps NCCL for every all-reduce"
    )


def TREADLE_MXFP4_DEQUANTIZE() -> bool | None:
    """``1`` dequantizes gpt-oss's MXFP4 experts to the model dtype at load (4x their memory, the bf16 fused-MoE
    kernel); ``0`` keeps them 4-bit on CUDA, run by the Triton MXFP4 fused-MoE kernel (quantization/mxfp4_experts.py);
    unset or ``auto`` (None): dequantized when they fit, i.e. when in the model dtype they would take at most half the
    GPU's memory (gpt-oss-20b: the bf16 kernel is 2.2x faster at batch 1, session 33), else kept 4-bit (gpt-oss-120b
    on one GPU). On the CPU they are always dequantized."""
    raw = os.environ.get("TREADLE_MXFP4_DEQUANTIZE", "auto")
    return None if raw.strip().lower() in ("", "auto") else parse_bool("TREADLE_MXFP4_DEQUANTIZE", raw)


def TREADLE_COMPILE_AHEAD() -> bool:
    """``1`` (default) compiles the Triton attention kernels' variants on a thread pool before the GPU start-up
    passes launch them (runner/precompile.py); ``0`` leaves each to compile on its first launch."""
    return parse_bool("TREADLE_COMPILE_AHEAD", os.environ.get("TREADLE_COMPILE_AHEAD", "1"))
