"""Tokenizer, chat template and generation-config defaults, all read from the model directory (no network).

- The tokenizer comes from `--tokenizer` or the model directory, through transformers' AutoTokenizer with
  `local_files_only=True` (a missing file is an error that names the directory, never a download).
  A directory with no tokenizer file at all (a `--load-format dummy` config directory) gets a `NoTokenizer`:
  prompts must be token ids, text prompts are a user error (HTTP 400), and each output token's text is its id
  as `<id>` (never empty, so every step still streams a chunk: TTFT and ITL stay measurable). That is what
  benchmarks on dummy weights need (`treadle bench` sends token ids).
- The chat template is the tokenizer's own, or `--chat-template` (a file path, or the Jinja text itself).
  A chat request against a model without one is a user error (HTTP 400) that says how to supply one.
- `generation_config.json` supplies default sampling fields (temperature, top_p, top_k, min_p,
  repetition_penalty, max_new_tokens) and extra EOS ids, unless the user passes generation_config="none".
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class ChatTemplateError(ValueError):
    """A chat request met a model without a chat template (HTTP 400)."""


_FAST_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")  # what AutoTokenizer maps these names to
# Any of these in a directory means it has a tokenizer (a broken one is then an error, not a NoTokenizer).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "tiktoken.model",
)


class NoTokenizer:
    """Stands in for the tokenizer of a model directory that has none: token ids in, token ids out.

    `encode` raises ValueError (HTTP 400) naming the fix; `decode` writes each id as `<id>`: context-free, so
    incremental detokenization emits exactly the new tokens, and never empty, so streams send one chunk per step.
    """

    eos_token_id = None
    chat_template = None

    def __init__(self, path: Path) -> None:
        self.path = path

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise self._no_text()

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{int(i)}>" for i in ids)

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | list[str]:
        return self.decode([ids]) if isinstance(ids, int) else [self.decode([i]) for i in ids]

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> str:
        raise self._no_text()

    def _no_text(self) -> ValueError:
        return ValueError(
            f"the model directory {str(self.path)!r} has no tokenizer, so text cannot be encoded; "
            "send token ids (prompt: [int, ...]) or start the server with --tokenizer DIR"
        )


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> Any:
    """AutoTokenizer from a local directory. When tokenizer_config.json names the generic fast tokenizer class
    (what AutoTokenizer would pick anyway), that class is loaded directly: it skips importing the auto-class
    machinery, a few seconds of start-up on a small machine."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"tokenizer directory {str(path)!r} does not exist; pass --tokenizer DIR")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        logger.warning(
            "%s has no tokenizer files (%s): token-id prompts only, output text is each token id as <id>; "
            "pass --tokenizer DIR for text",
            path,
            ", ".join(_TOKENIZER_FILES),
        )
        return NoTokenizer(path)
    try:
        if _tokenizer_class(path) in _FAST_CLASSES and (path / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as e:
        raise ValueError(
            f"could not load a tokenizer from {str(path)!r} ({type(e).__name__}: {e}); the directory needs "
            "tokenizer.json or tokenizer_config.json + vocabulary files; pass --tokenizer DIR to use another"
        ) from e


def _tokenizer_class(path: Path) -> str | None:
    try:
        value = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get(
            "tokenizer_class"
        )
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def resolve_chat_template(tokenizer: Any, override: str | None, model_dir: Path | None = None) -> str | None:
    """The chat template to use: `override` (a file path or the template text), else the tokenizer's, else the one
    a multimodal checkpoint keeps for its processor in `model_dir`/chat_template.json (Mistral Small 3.1 keeps it
    only there; vLLM falls back to the processor's template the same way)."""
    if override:
        p = Path(override)
        if len(override) < 4096 and p.is_file():
            return p.read_text(encoding="utf-8")
        if "{" not in override:
            raise ValueError(
                f"--chat-template {override!r} is neither an existing file nor a Jinja template; "
                "pass a path to a .jinja file or the template text"
            )
        return override
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: use "default"
        template = template.get("default") or next(iter(template.values()), None)
    if template is None and model_dir is not None:
        template = _processor_chat_template(model_dir / "chat_template.json")
    return template


def _processor_chat_template(path: Path) -> str | None:
    """`{"chat_template": "..."}` of a processor's chat_template.json, when the file is there."""
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path} is not a JSON object with a chat_template string ({exc})") from None
    if not isinstance(template, str):
        raise ValueError(f"{path}: chat_template must be a string, got {type(template).__name__}")
    return template


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults from generation_config.json; fields the request leaves unset take these."""

    sampling: dict[str, float | int] = field(default_factory=dict)  # SamplingParams field -> default
    max_new_tokens: int | None = None  # default max_tokens, when the model declares one
    eos_token_ids: frozenset[int] = frozenset()  # extra end-of-sequence ids


def load_generation_defaults(model_dir: str | Path | None, mode: str = "auto") -> GenerationDefaults:
    """Reads `<model_dir>/generation_config.json` (mode "auto") or nothing (mode "none")."""
    if mode == "none" or model_dir is None:
        return GenerationDefaults()
    path = Path(mode) / "generation_config.json" if mode not in ("auto", "vllm") else None
    if path is not None and not path.parent.is_dir():
        raise ValueError(f"--generation-config {mode}: no such directory (pass a directory holding "
                         "generation_config.json, 'auto' or 'none')")  # fmt: skip
    if path is None:
        path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        if mode not in ("auto", "vllm"):
            logger.warning("--generation-config %s has no generation_config.json: no default sampling parameters",
                           mode)  # fmt: skip
        return GenerationDefaults()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix it or pass --generation-config none") from e
    sampling: dict[str, float | int] = {}
    for name in _DEFAULT_FIELDS:
        value = data.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            sampling.setdefault(name, value)
    eos = data.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else [e for e in (eos or []) if isinstance(e, int)]
    max_new = data.get("max_new_tokens")
    defaults = GenerationDefaults(
        sampling=sampling,
        max_new_tokens=max_new if isinstance(max_new, int) and max_new > 0 else None,
        eos_token_ids=frozenset(eos_ids),
    )
    if sampling:
        logger.info("Default sampling parameters from %s: %s", path, sampling)
    return defaults


def eos_token_ids(tokenizer: Any, defaults: GenerationDefaults) -> set[int]:
    ids = set(defaults.eos_token_ids)
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    return ids
