"""Reading weights out of an HF-format directory: safetensors, one file or sharded through an index.

Theory: an HF directory holds ``config.json`` and either one ``model.safetensors`` or shards named by
``model.safetensors.index.json`` (its ``weight_map`` sends each tensor name to a shard file). Weights are
yielded lazily, one ``(hf_name, tensor)`` pair at a time, shard by shard, as views of the memory-mapped file
(:mod:`treadle_model_runner.loader.mapped_file`), so loading is one copy from the page cache into the
model's parameters and peak host memory stays at what the model itself holds.

Invariants:
- Every problem found on disk raises ``ValueError`` naming the file and the problem, before or while the
  tensors stream: missing directory, missing config.json, index naming an absent shard, a corrupt or
  truncated safetensors file, a tensor the index promises but the shard lacks, a name present twice.
- Pickle checkpoints (``*.bin``, ``*.pt``) are never opened: unpickling runs arbitrary code.
- ``plan_safetensors`` validates the whole layout (headers included) without reading tensor data, so a
  bad shard is reported before any weight reaches the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from treadle_model_runner.loader.mapped_file import MappedSafetensors

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
WEIGHT_LOAD_FORMATS = ("auto", "safetensors", "gguf")  # the formats iterate_weights reads
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# checkpoint tensor name -> the name the model loads it as, or None: the tensor is not read
WeightNames = Callable[[str], str | None]

_CONVERT_HINT = (
    "convert it once with transformers: "
    "`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT_DIR, safe_serialization=True)`"
)


@dataclass(frozen=True, slots=True)
class SafetensorsPlan:
    files: tuple[Path, ...]  # shard files in reading order
    names: dict[Path, tuple[str, ...]]  # shard -> tensor names to read from it (HF names)


def check_model_dir(path: Path) -> None:
    """Raise ValueError unless ``path`` is an existing directory holding a config.json."""
    if not path.exists():
        raise ValueError(
            f"model directory {path} does not exist; pass an HF-format directory or a .gguf file"
        )
    if not path.is_dir():
        raise ValueError(
            f"{path} is not a directory; pass an HF-format directory (config.json + *.safetensors)"
        )
    if not (path / CONFIG_FILE).is_file():
        raise ValueError(
            f"{path / CONFIG_FILE} is missing: {path} is not an HF-format model directory "
            "(it needs config.json next to its *.safetensors weights)"
        )


def _read_header_names(file: Path) -> tuple[str, ...]:
    try:
        with safe_open(str(file), framework="pt") as handle:
            return tuple(handle.keys())
    except SafetensorError as exc:
        raise ValueError(
            f"safetensors file {file} is corrupt or truncated ({exc}); re-download or re-convert it"
        ) from exc
    except OSError as exc:
        raise ValueError(f"safetensors file {file} cannot be read ({exc})") from exc


def _plan_from_index(path: Path) -> SafetensorsPlan:
    index_file = path / INDEX_FILE
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(
            f"index file {index_file} is not a valid safetensors index ({exc}); "
            "it needs a 'weight_map' object mapping tensor names to shard files"
        ) from exc
    by_file: dict[Path, list[str]] = {}
    for name, shard in weight_map.items():
        by_file.setdefault(path / shard, []).append(name)
    for shard, wanted in sorted(by_file.items()):
        if not shard.is_file():
            raise ValueError(
                f"shard {shard} is missing: {index_file} maps {len(wanted)} tensors (e.g. {wanted[0]!r}) "
                "to it; the download or copy is incomplete"
            )
        present = set(_read_header_names(shard))
        absent = [name for name in wanted if name not in present]
        if absent:
            raise ValueError(
                f"shard {shard} lacks {len(absent)} tensors that {index_file} assigns to it (e.g. {absent[0]!r}); "
                "the shard and the index disagree"
            )
    files = tuple(sorted(by_file))
    return SafetensorsPlan(files=files, names={f: tuple(by_file[f]) for f in files})


def plan_safetensors(path: Path) -> SafetensorsPlan:
    """Validate an HF directory's safetensors layout and say which tensors to read from which file."""
    check_model_dir(path)
    if (path / INDEX_FILE).is_file():
        return _plan_from_index(path)
    files = tuple(sorted(path.glob("*.safetensors")))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"{path} holds only PyTorch pickle weights ({', '.join(pickles[:3])}), which treadle does not "
                f"load (unpickling can run arbitrary code); {_CONVERT_HINT}"
            )
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds {ggufs[0]}: pass that file with load_format 'gguf'" if ggufs else ""
        raise ValueError(f"{path} holds no *.safetensors weights{hint}")
    names: dict[Path, tuple[str, ...]] = {}
    owner: dict[str, Path] = {}
    for file in files:
        names[file] = _read_header_names(file)
        for name in names[file]:
            if name in owner:
                raise ValueError(
                    f"tensor {name!r} appears in both {owner[name]} and {file}, and {path} has no {INDEX_FILE} "
                    "to say which one to use; remove the stray file or add the index"
                )
            owner[name] = file
    return SafetensorsPlan(files=files, names=names)


def describe_checkpoint(path: Path) -> str:
    """Where `iterate_weights` reads a checkpoint's tensors, for errors about tensors it lacks: the .gguf file, or
    the directory and its safetensors files (the index when there is one)."""
    path = Path(path)
    if path.suffix == ".gguf" or not path.is_dir():
        return f"checkpoint {path}"
    if (path / INDEX_FILE).is_file():
        return f"checkpoint {path} ({INDEX_FILE} and the shards it names)"
    files = sorted(p.name for p in path.glob("*.safetensors"))
    shown = ", ".join(files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
    return f"checkpoint {path} ({shown})"


def iterate_safetensors(
    path: Path, dtype: torch.dtype | None = None, names: WeightNames | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for every weight of an HF directory, shard by shard; with `names`, the
    tensors it names, under those names (the others are never read)."""
    plan = plan_safetensors(path)
    logger.info("reading %d safetensors file(s) from %s", len(plan.files), path)
    for file in plan.files:
        renamed = ((name, names(name) if names else name) for name in plan.names[file])
        wanted = [(name, as_named) for name, as_named in renamed if as_named is not None]
        if not wanted:
            continue
        try:
            mapped = MappedSafetensors(file)
            with safe_open(str(file), framework="pt") as handle:
                for name, as_named in wanted:
                    tensor = mapped.get(name)
                    if tensor is None:
                        tensor = handle.get_tensor(name)
                    yield as_named, tensor if dtype is None else tensor.to(dtype)
        except SafetensorError as exc:
            raise ValueError(f"safetensors file {file} is corrupt or truncated ({exc})") from exc


def iterate_weights(
    path: Path, load_format: str = "auto", dtype: torch.dtype | None = None, names: WeightNames | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for every weight at ``path``.

    ``path`` is an HF-format directory (safetensors, single or sharded) or, with load_format ``gguf`` or
    ``auto``, a ``.gguf`` file whose tensors are dequantized on the fly and renamed to HF names.
    ``dtype`` casts each tensor (None keeps the stored dtype). ``names`` renames each tensor, or skips it where
    it answers None (safetensors: unread; e.g. loader/multimodal.py's vision tower). Problems raise ValueError
    naming the file.
    """
    path = Path(path)
    if load_format == "dummy":
        raise ValueError(
            "load_format 'dummy' reads no weights from disk; initialise the model with load_dummy_weights(model, seed)"
        )
    if load_format not in WEIGHT_LOAD_FORMATS:
        raise ValueError(
            f"load_format {load_format!r} is not one of {', '.join(WEIGHT_LOAD_FORMATS)} (or 'dummy', which "
            "reads nothing)"
        )
    is_gguf_file = path.suffix == ".gguf"
    if load_format == "gguf" or (load_format == "auto" and is_gguf_file):
        from treadle_model_runner.loader.gguf_weights import iterate_gguf_weights

        for name, tensor in iterate_gguf_weights(path, dtype=dtype or torch.float32):
            as_named = names(name) if names else name
            if as_named is not None:
                yield as_named, tensor
        return
    yield from iterate_safetensors(path, dtype=dtype, names=names)
