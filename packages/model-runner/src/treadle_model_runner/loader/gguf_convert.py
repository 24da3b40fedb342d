"""GGUF file -> HF-format directory (safetensors, config.json, tokenizer files, generation_config.json).

Theory: conversion is a pure function of the GGUF file and the storage dtype. Tensors stream out of the
reader one at a time and are flushed into safetensors shards of at most ``max_shard_bytes``, so peak memory
is one shard, not the whole model. One shard is named ``model.safetensors``; several get the usual
``model-0000i-of-0000n.safetensors`` names plus ``model.safetensors.index.json``.

Invariants: this module writes into the directory it is given and nothing else; making that directory
appear atomically under its final name, durably (``fsync_tree`` before the rename), is the cache's job
(:mod:`treadle_model_runner.loader.cache`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from treadle_model_runner.loader.gguf_config import generation_config_dict, hf_config_dict
from treadle_model_runner.loader.gguf_tokenizer import write_tokenizer_files
from treadle_model_runner.loader.gguf_weights import count_gguf_tensors, iterate_gguf_tensors, open_gguf
from treadle_model_runner.loader.weights import INDEX_FILE

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]  # (tensors done, tensors total)
DEFAULT_MAX_SHARD_BYTES = 4 << 30


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and the directory itself, so a later rename publishes durable data."""
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_shards(
    tensors: Any, out_dir: Path, max_shard_bytes: int, total: int, progress: ProgressCallback | None
) -> None:
    shards: list[list[str]] = []  # names per shard file, in order
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        save_file(pending, str(out_dir / f"shard-{len(shards):05d}.tmp"), metadata={"format": "pt"})
        shards.append(list(pending))
        pending, pending_bytes = {}, 0

    for done, (name, tensor) in enumerate(tensors, start=1):
        nbytes = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + nbytes > max_shard_bytes:
            flush()
        pending[name] = tensor
        pending_bytes += nbytes
        if progress is not None:
            progress(done, total)
    if pending or not shards:
        flush()
    if len(shards) == 1:
        (out_dir / "shard-00000.tmp").rename(out_dir / "model.safetensors")
        return
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (out_dir / f"shard-{i:05d}.tmp").rename(out_dir / final)
        weight_map.update(dict.fromkeys(names, final))
    total_size = sum((out_dir / f).stat().st_size for f in set(weight_map.values()))
    _write_json(out_dir / INDEX_FILE, {"metadata": {"total_size": total_size}, "weight_map": weight_map})


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    dtype: torch.dtype = torch.float32,
    progress: ProgressCallback | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write the HF-format equivalent of ``gguf_path`` into the existing, empty directory ``out_dir``.

    Tensors are dequantized to ``dtype``; ``progress(done, total)`` is called after each tensor.
    """
    reader = open_gguf(Path(gguf_path))
    config = hf_config_dict(reader, dtype)
    total = count_gguf_tensors(reader)
    logger.info("converting %s (%d tensors) to %s as %s", gguf_path, total, out_dir, dtype)
    # the tokenizer first: a file whose tokenizer cannot be rebuilt fails before its weights are dequantized
    write_tokenizer_files(reader, out_dir, model_max_length=int(config["max_position_embeddings"]))
    _write_shards(iterate_gguf_tensors(reader, dtype), out_dir, max_shard_bytes, total, progress)
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", generation_config_dict(reader))
