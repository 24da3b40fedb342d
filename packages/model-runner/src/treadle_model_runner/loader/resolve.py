"""From what the user named to an HF-format directory, its config and how to read its weights.

Theory: every source ends as a local HF-format directory. ``model`` empty -> the embedded default
(converted once into the cache); a ``.gguf`` file, or a directory holding one and no safetensors -> converted
once into ``<cache>/models/gguf/<stem>-<fingerprint>``; a directory with safetensors -> itself; ``dummy`` ->
the directory of a config.json, no weights. The transformers config is read from the local config.json
only (``local_files_only``): nothing is ever downloaded, whatever HF_HUB_OFFLINE says.

Invariants: ``ResolvedModel.format`` is ``"safetensors"`` or ``"dummy"`` (GGUF is already converted);
every problem raises ValueError naming the path and the fix, before any weight is read.

Multimodal checkpoints (Gemma 3 4B-27B, Mistral Small 3.1/3.2) resolve to their text model: ``hf_config`` is the
text config and ``multimodal`` names how the weights are renamed (``multimodal.py``); images are not served.

Light configs. For Llama, Mistral, Qwen2/3, Qwen3-MoE, Mixtral and gpt-oss config.json files that spell out the fields
whose defaults differ between families, the config is read without transformers (``light_config.py``).

Config cache. Importing any transformers 5 model config class pulls in torch.distributed and sympy (1.5 s with
cached bytecode, 3-4 s without), a third of a warm start. So the first read of a config.json stores the
resolved config's ``to_dict()`` (every field, defaults and rope standardisation included) under
``<cache>/configs/<sha256 of path, config.json bytes, transformers version>.json``; later reads rebuild it as a
base ``PretrainedConfig`` with the same attribute values (not the subclass). Config classes with sub-configs,
attribute aliases (``attribute_map``) or properties are never cached; an unreadable cache entry is ignored.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from treadle_model_runner import envs
from treadle_model_runner.config import LOAD_FORMATS, ModelConfig
from treadle_model_runner.loader.cache import convert_gguf_cached, models_cache_dir
from treadle_model_runner.loader.default_model import default_model_path
from treadle_model_runner.loader.light_config import light_config
from treadle_model_runner.loader.multimodal import (
    CARRIED_FIELDS,
    MultimodalWrapper,
    multimodal_wrapper,
    text_config_of,
)
from treadle_model_runner.loader.weights import CONFIG_FILE, INDEX_FILE, PICKLE_SUFFIXES, plan_safetensors

if TYPE_CHECKING:
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

_GGUF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# dtype "auto" stores small GGUFs as fp32 (dequantized values kept exactly) and larger ones as bf16, so a
# 4 GB Q4 file does not become 30 GB on disk; the runner casts to its compute dtype either way.
AUTO_FP32_MAX_GGUF_BYTES = 1 << 30


def gguf_storage_dtype(gguf_path: Path, dtype: str) -> torch.dtype:
    """The dtype a GGUF file is dequantized to on conversion, for ModelConfig.dtype ``dtype``."""
    if dtype != "auto":
        return _GGUF_DTYPES[dtype]
    return torch.float32 if gguf_path.stat().st_size < AUTO_FP32_MAX_GGUF_BYTES else torch.bfloat16


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # HF-format directory: config.json, plus safetensors unless format is "dummy"
    hf_config: PretrainedConfig  # transformers config read from path/config.json
    format: str  # how to get the weights: "safetensors" (iterate_weights(path)) or "dummy" (random)
    tokenizer_path: Path  # directory with tokenizer.json: ModelConfig.tokenizer, else path
    source: Path | None  # what the user named (a .gguf file or a directory); None for the default model
    # a multimodal checkpoint served as its text model: how its tensors are named (multimodal.py); None otherwise
    multimodal: MultimodalWrapper | None = None


def load_hf_config(path: Path, overrides: dict[str, Any] | None = None) -> PretrainedConfig:
    """The transformers config of an HF-format directory, from its local config.json only; `overrides` replace
    config.json's top-level fields first (ModelConfig.hf_overrides)."""
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise ValueError(f"{config_file} is missing: {path} is not an HF-format model directory")
    try:
        raw = json.loads(config_file.read_text())
        light = light_config(with_overrides(raw, overrides) if overrides else raw)
    except (ValueError, UnicodeDecodeError):
        light = None  # transformers below names what is wrong with the file
    if light is not None:
        return light  # type: ignore[return-value]  # the fields the models read, as transformers gives them
    if overrides:
        return _overridden_config(config_file, overrides)
    cache_file = _config_cache_file(config_file)
    cached = _read_cached_config(cache_file)
    if cached is not None:
        return cached
    from transformers import AutoConfig  # lazy: importing transformers costs seconds

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except _config_errors() as exc:  # e.g. a field of the wrong type
        raise ValueError(f"{config_file} cannot be read as a transformers config ({exc})") from exc
    _write_cached_config(cache_file, config)
    return config


def with_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """config.json's fields with `overrides` in place. A `rope_scaling` override (the spelling before transformers 5)
    over a file that has a flat `rope_parameters` dict (transformers 5's) updates that dict, the file's rope_theta
    kept: otherwise the file's dict would win on the light path, and transformers would drop the theta. A flat
    `rope_parameters` override without rope_theta / partial_rotary_factor keeps the file's (top-level or in its
    dict), and a `rope_theta` override reaches the file's dict. A sub-config (a dict with a model_type, e.g. a
    multimodal checkpoint's text_config) is updated field by field, not replaced."""
    values = {**raw, **overrides}
    for key, value in overrides.items():
        sub = raw.get(key)
        if isinstance(value, dict) and isinstance(sub, dict) and "model_type" in sub:
            values[key] = with_overrides(sub, value)
    scaling, rope = overrides.get("rope_scaling"), raw.get("rope_parameters")
    flat_rope: dict[str, Any] = rope if isinstance(rope, dict) and "rope_theta" in rope else {}
    if isinstance(scaling, dict) and "rope_parameters" not in overrides and flat_rope:
        scaling = dict(scaling)
        if "type" in scaling:
            scaling.setdefault("rope_type", scaling.pop("type"))
        values["rope_parameters"] = {**flat_rope, **scaling}
        del values["rope_scaling"]
    new_rope = overrides.get("rope_parameters")
    if isinstance(new_rope, dict) and "rope_type" in new_rope:
        kept: dict[str, Any] = {}
        for field in ("rope_theta", "partial_rotary_factor"):
            file_value = flat_rope.get(field, raw.get(field))
            if field not in new_rope and file_value is not None:
                kept[field] = file_value
        values["rope_parameters"] = {**new_rope, **kept}
    current = values.get("rope_parameters")
    theta_only = "rope_theta" in overrides and "rope_parameters" not in overrides
    if theta_only and isinstance(current, dict) and "rope_theta" in current:
        values["rope_parameters"] = {**current, "rope_theta": overrides["rope_theta"]}
    return values


def _overridden_config(config_file: Path, overrides: dict[str, Any]) -> PretrainedConfig:
    """transformers' config of config.json with `overrides` in place of its fields, built as from the file."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**with_overrides(json.loads(config_file.read_text()), overrides))
    except _config_errors() as exc:
        raise ValueError(
            f"{config_file} with hf_overrides {sorted(overrides)} cannot be read as a transformers config ({exc})"
        ) from exc


def _config_errors() -> tuple[type[Exception], ...]:
    """What building a transformers config from bad fields raises: the builtin errors, and huggingface_hub's
    strict-dataclass validation (transformers 5 configs check field types with it; not a ValueError)."""
    errors: tuple[type[Exception], ...] = (OSError, ValueError, KeyError, TypeError, AttributeError)
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub: no strict dataclasses
        return errors
    return (*errors, StrictDataclassError)


def _config_cache_file(config_file: Path) -> Path:
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    digest = hashlib.sha256()
    for part in (str(config_file.parent.resolve()).encode(), config_file.read_bytes(), version.encode()):
        digest.update(part + b"\0")
    return envs.TREADLE_CACHE_DIR() / "configs" / f"{digest.hexdigest()[:24]}.json"


def _read_cached_config(cache_file: Path) -> PretrainedConfig | None:
    if not cache_file.is_file():
        return None
    try:
        values = json.loads(cache_file.read_text())
        from transformers.configuration_utils import (
            PretrainedConfig,
        )  # the base class only: no torch.distributed

        return PretrainedConfig(**values)
    except Exception as exc:  # a stale or damaged entry: read config.json the slow way
        logger.debug("ignoring config cache %s (%s)", cache_file, exc)
        return None


def _write_cached_config(cache_file: Path, config: PretrainedConfig) -> None:
    cls = type(config)
    if (
        getattr(config, "sub_configs", None)
        or getattr(cls, "attribute_map", None)
        or any(isinstance(v, property) for v in vars(cls).values())
    ):
        return  # aliases, properties or nested configs the base class would not reproduce
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(config.to_dict()))
        os.replace(tmp, cache_file)
    except (OSError, TypeError, ValueError) as exc:  # caching is an optimisation only
        logger.debug("config cache %s not written (%s)", cache_file, exc)


def _find_gguf(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise ValueError(
            f"{path} holds {len(found)} GGUF files ({', '.join(p.name for p in found[:4])}); pass one file"
        )
    return found[0] if found else None


def detect_load_format(path: Path) -> str:
    """``safetensors`` or ``gguf`` for an existing path, from the files it holds."""
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        raise ValueError(
            f"{path} is a file but not a .gguf file; pass an HF-format directory (config.json + *.safetensors) "
            "or a .gguf file"
        )
    if (path / INDEX_FILE).is_file() or any(path.glob("*.safetensors")):
        return "safetensors"
    if _find_gguf(path) is not None:
        return "gguf"
    if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
        return "safetensors"  # plan_safetensors explains that pickle weights are refused and how to convert
    raise ValueError(
        f"{path} holds no weights (no *.safetensors, no .gguf); for random weights from its config.json use "
        "load_format 'dummy'"
    )


def _gguf_fingerprint(gguf_path: Path) -> str:
    stat = gguf_path.stat()
    return f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def convert_gguf_to_cache(gguf_path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """The cached HF-format directory of a GGUF file, converting it on first use."""
    fingerprint = _gguf_fingerprint(gguf_path)
    digest = hashlib.sha256(f"{fingerprint}:{dtype}".encode()).hexdigest()[:12]
    out_dir = models_cache_dir() / "gguf" / f"{gguf_path.stem}-{digest}"
    return convert_gguf_cached(gguf_path, out_dir, fingerprint, dtype)


def resolve_model(model_config: ModelConfig) -> ResolvedModel:
    """Turn ``model_config.model`` (+ load_format) into a local HF-format directory and its config."""
    load_format = model_config.load_format
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
    source: Path | None = None
    if not model_config.model:
        path = default_model_path()
        load_format = "dummy" if load_format == "dummy" else "safetensors"
    else:
        source = Path(model_config.model).expanduser()
        if not source.exists():
            hub_hint = (
                f" (treadle never downloads: fetch it first, e.g. `hf download {model_config.model} --local-dir DIR`)"
                if model_config.model.count("/") == 1 and not source.is_absolute()
                else ""
            )
            raise ValueError(
                f"model {model_config.model!r}: {source} does not exist; pass an HF-format directory, a .gguf "
                f"file, or no model for the embedded default{hub_hint}"
            )
        path = source
        if load_format == "auto":
            load_format = detect_load_format(source)
        if load_format == "dummy" and source.is_file() and source.name.endswith(".json"):
            path = source.parent
        elif load_format == "gguf":
            gguf_path = _find_gguf(source)
            if gguf_path is None:
                raise ValueError(f"load_format 'gguf' was asked but {source} is not and holds no .gguf file")
            path = convert_gguf_to_cache(gguf_path, gguf_storage_dtype(gguf_path, model_config.dtype))
            load_format = "safetensors"
        elif load_format == "safetensors":
            plan_safetensors(source)  # validates the layout now, before the model is built
    hf_config = load_hf_config(path, model_config.hf_overrides)
    if model_config.hf_overrides:
        logger.info("config.json fields overridden: %s", ", ".join(sorted(model_config.hf_overrides)))
    multimodal = multimodal_wrapper(hf_config)
    if multimodal is not None:
        hf_config = text_config_of(hf_config, multimodal)
        logger.info(
            "%s: serving its language model as %s; the vision tower is not served (never loaded) and requests "
            "with images are refused", multimodal.architecture, multimodal.text_architecture,
        )  # fmt: skip
        unused = sorted(set(model_config.hf_overrides or {}) - {"text_config", *CARRIED_FIELDS})
        if unused:
            logger.warning(
                "hf_overrides %s set fields of %s's top-level config, which the text model does not read: "
                "override them inside it, e.g. {\"text_config\": {\"%s\": ...}}", ", ".join(unused),
                multimodal.architecture, unused[0],
            )  # fmt: skip
    tokenizer_path = Path(model_config.tokenizer).expanduser() if model_config.tokenizer else path
    logger.info("model %s resolved to %s (weights: %s)", model_config.model or "<default>", path, load_format)
    return ResolvedModel(
        path=path, hf_config=hf_config, format=load_format, tokenizer_path=tokenizer_path, source=source,
        multimodal=multimodal,
    )  # fmt: skip
