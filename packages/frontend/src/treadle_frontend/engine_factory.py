"""From user options to a running engine client plus the frontend's InputProcessor.

`EngineArgs.from_kwargs(model, **options)` splits vLLM-style keyword options over the four config
dataclasses (ModelConfig, CacheConfig and LoRAConfig of the model runner, SchedulerConfig of the engine core) and the
frontend's own (chat_template, generation_config); an unknown option is an error that lists the valid ones.
`speculative_config` (vLLM's: a dict, its JSON text or a SpeculativeConfig) is parsed there too, so a bad key fails
before anything starts.
`start_inproc` (offline LLM), `start_sync_mp` (offline LLM, the engine in its own process) and
`start_async_mp` (API server: the engine in its own process) resolve the model
(the embedded default when none is named), load the tokenizer, start the engine, and read the model facts the
frontend needs (max_model_len, vocab size, KV capacity, max_logprobs) from the engine's READY handshake.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from treadle_frontend.input_processor import InputProcessor, ModelInfo
from treadle_frontend.tokenizer import load_generation_defaults, load_tokenizer, resolve_chat_template
from treadle_model_runner.config import CacheConfig, LoRAConfig, ModelConfig, SpeculativeConfig

logger = logging.getLogger(__name__)

_ALIASES: dict[str, str | None] = {
    "scheduling_policy": "policy",
    "tokenizer_mode": None,
    "trust_remote_code": None,
}
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # the embedded default, as the loader names its cache directory
_CONVERSION_MARKER = "treadle_conversion.json"  # written last by the loader's converter
_FRONTEND_FIELDS = (
    "chat_template",
    "generation_config",
    "executor",
    "fake_runner",
    "log_stats",
    "data_parallel_size",
    "speculative_config",
)


@dataclass(frozen=True)
class EngineArgs:
    model_config: ModelConfig
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: Any = None  # treadle_engine_core.config.SchedulerConfig (None = its defaults)
    chat_template: str | None = None  # a Jinja file or text overriding the tokenizer's template
    generation_config: str = "auto"  # auto | none | a directory holding generation_config.json
    executor: str = "inproc"  # inproc (the real model runner) | fake (engine core's fake runner, tests)
    fake_runner: Any = None  # FakeRunnerConfig when executor == "fake"
    log_stats: bool = True
    data_parallel_size: int = 1  # engine processes behind the API server (treadle serve -dp N)
    lora_config: LoRAConfig = field(default_factory=LoRAConfig)  # enable_lora, max_loras, max_lora_rank, ...
    speculative_config: SpeculativeConfig | None = None  # speculative decoding (None: off)

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs: Any) -> EngineArgs:
        from treadle_engine_core.config import (
            SchedulerConfig,
            parse_speculative_config,
        )

        groups: dict[type, dict[str, Any]] = {
            ModelConfig: {},
            CacheConfig: {},
            SchedulerConfig: {},
            LoRAConfig: {},
        }
        own: dict[str, Any] = {}
        if kwargs.get("tensor_parallel_size", 1) is None:
            kwargs["tensor_parallel_size"] = 1
        for raw_key, value in kwargs.items():
            key: str | None = _ALIASES.get(raw_key, raw_key)
            if key is None:
                continue
            if key in _FRONTEND_FIELDS:
                own[key] = value
                continue
            for cfg in groups:
                if key in {f.name for f in dataclasses.fields(cfg)}:
                    groups[cfg][key] = value
                    break
            else:
                valid = sorted(
                    {f.name for cfg in groups for f in dataclasses.fields(cfg)} | set(_FRONTEND_FIELDS)
                )
                raise ValueError(f"unknown engine option {key!r}; valid options: {', '.join(valid)}")
        if "speculative_config" in own:
            own["speculative_config"] = parse_speculative_config(own["speculative_config"])
        model_config = ModelConfig(model=model or "", **groups[ModelConfig])
        max_len = model_config.max_model_len
        sched = groups[SchedulerConfig]
        if max_len is not None:
            sched.setdefault("max_model_len", max_len)
        return cls(
            model_config=model_config,
            cache_config=CacheConfig(**groups[CacheConfig]),
            scheduler_config=SchedulerConfig(**sched),
            lora_config=LoRAConfig(**groups[LoRAConfig]),
            **own,
        )

    def engine_config(self, model_config: ModelConfig) -> Any:
        from treadle_engine_core.config import EngineConfig, FakeRunnerConfig, SchedulerConfig

        extra: dict[str, Any] = {}
        if self.fake_runner is not None:
            extra["fake_runner"] = (
                self.fake_runner
                if isinstance(self.fake_runner, FakeRunnerConfig)
                else FakeRunnerConfig(**self.fake_runner)
            )
        return EngineConfig(
            model_config=model_config,
            cache_config=self.cache_config,
            scheduler_config=self.scheduler_config or SchedulerConfig(),
            executor=self.executor,
            log_stats=self.log_stats,
            data_parallel_size=self.data_parallel_size,
            lora_config=self.lora_config,
            speculative_config=self.speculative_config,
            **extra,
        )


@dataclass
class Prepared:
    model_config: ModelConfig  # with model = the resolved HF-format directory
    tokenizer: Any
    tokenizer_path: Path
    served_name: str
    model_path: Path


def _model_dir(mc: ModelConfig) -> tuple[Path, Path | None]:
    """(HF-format directory, what the user named): a plain directory is used as is; the default model, GGUF
    files and anything else go through the loader (which converts once into the cache)."""
    if mc.model:
        source = Path(mc.model).expanduser()
        has_weights = mc.load_format == "dummy" or any(source.glob("*.safetensors"))
        if (
            source.is_dir()
            and (source / "config.json").is_file()
            and has_weights
            and mc.load_format != "gguf"
        ):
            return source, source
        from treadle_model_runner.loader import resolve_model

        resolved = resolve_model(mc)
        return resolved.path, resolved.source
    from treadle_model_runner import envs as runner_envs

    cached = runner_envs.TREADLE_CACHE_DIR() / "models" / DEFAULT_MODEL_NAME
    if (cached / _CONVERSION_MARKER).is_file() and (cached / "tokenizer.json").is_file():
        # Already converted: the engine process checks the conversion is current (and redoes it under the
        # loader's lock if not); here only the tokenizer is read, so skip importing the loader and torch.
        return cached, None
    from treadle_model_runner.loader import default_model_path

    return default_model_path(), None


def prepare(args: EngineArgs) -> Prepared:
    """Finds the model directory (converting GGUF / the embedded default once) and loads the tokenizer."""
    mc = args.model_config
    path, source = _model_dir(mc)
    name = mc.served_model_name
    if name is None:
        name = source.stem if source is not None and source.is_file() else path.name
    tokenizer_path = Path(mc.tokenizer).expanduser() if mc.tokenizer else path
    model_config = dataclasses.replace(mc, served_model_name=name)
    tokenizer = load_tokenizer(tokenizer_path)
    return Prepared(model_config, tokenizer, tokenizer_path, name, path)


def model_type(model_dir: Path) -> str | None:
    """config.json's model_type (None without one): the server reads some models' replies by it (gpt_oss)."""
    try:
        value = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def make_input_processor(args: EngineArgs, prep: Prepared, ready: Any) -> InputProcessor:
    """The InputProcessor for a started engine; `ready` is its EngineReady handshake."""
    info = ModelInfo(
        name=prep.served_name,
        path=prep.model_path,
        max_model_len=int(ready.max_model_len),
        vocab_size=int(ready.vocab_size),
        kv_capacity_tokens=getattr(ready, "kv_capacity_tokens", None),
        runtime=dict(getattr(ready, "runtime", None) or {}),
        scheduling_policy=str(getattr(ready, "scheduling_policy", "fcfs")),
        max_logprobs=int(getattr(ready, "max_logprobs", args.model_config.max_logprobs)),
        pooler=args.model_config.pooler_config,
        num_speculative_tokens=args.speculative_config.num_speculative_tokens
        if args.speculative_config
        else 0,
        model_type=model_type(prep.model_path),
    )
    defaults = load_generation_defaults(prep.model_path, args.generation_config)
    template = resolve_chat_template(prep.tokenizer, args.chat_template, prep.tokenizer_path)
    return InputProcessor(prep.tokenizer, info, defaults, template)


def _one_engine(args: EngineArgs) -> None:
    if args.data_parallel_size != 1:
        raise ValueError(
            f"data_parallel_size {args.data_parallel_size}: the offline LLM drives one engine; serve with "
            "`treadle serve -dp N` for N engine processes"
        )


def start_inproc(args: EngineArgs) -> tuple[Any, InputProcessor]:
    from treadle_engine_core.client import InprocClient

    _one_engine(args)
    prep = prepare(args)
    client = InprocClient(args.engine_config(prep.model_config))
    return client, make_input_processor(args, prep, client.ready)


def start_async_mp(args: EngineArgs) -> tuple[Any, InputProcessor]:
    """The API server's engine: in its own process (one per data-parallel rank), driven from an asyncio loop."""
    from treadle_engine_core.client import AsyncMPClient
    from treadle_engine_core.dp_client import AsyncDPClient

    return _start_mp(args, AsyncDPClient if args.data_parallel_size > 1 else AsyncMPClient)


def start_sync_mp(args: EngineArgs) -> tuple[Any, InputProcessor]:
    """The offline LLM's engine in its own process (`LLM(engine_process=True)`): scheduling and the model's
    launches run beside this process's output processing (detokenizing, logprobs) instead of sharing its GIL."""
    from treadle_engine_core.client import SyncMPClient

    _one_engine(args)
    return _start_mp(args, SyncMPClient)


def _start_mp(args: EngineArgs, client_cls: Any) -> tuple[Any, InputProcessor]:
    """Starts the engine process and, while it boots, resolves the model and loads the tokenizer here.

    The two processes import torch and read the model at the same time, which roughly halves the time to
    ready on a cold cache of Python modules. A GGUF conversion both would need is serialized by the loader's
    file lock, so it happens once.
    """
    import threading

    booted: dict[str, Any] = {}

    def boot() -> None:
        try:
            booted["client"] = client_cls(args.engine_config(args.model_config))
        except BaseException as e:  # re-raised in the caller's thread
            booted["error"] = e

    t0 = time.monotonic()
    thread = threading.Thread(target=boot, name="treadle-engine-boot", daemon=True)
    thread.start()
    try:
        prep = prepare(args)
        logger.info(
            "Model resolved and tokenizer loaded in %.1f s; waiting for the engine process",
            time.monotonic() - t0,
        )
    except BaseException:
        thread.join()
        if "client" in booted:
            booted["client"].shutdown()
        raise
    thread.join()
    if "error" in booted:
        raise booted["error"]
    client = booted["client"]
    return client, make_input_processor(args, prep, client.ready)
