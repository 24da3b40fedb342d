"""`treadle serve [MODEL]`: the OpenAI/Anthropic-compatible server, engine in its own process.

Flags take their defaults from the config dataclasses (ModelConfig, CacheConfig, SchedulerConfig,
ServerConfig), with vLLM's spellings. Start-up: resolve the model (the embedded SmolLM2-135M-Instruct when
none is named; converted once into the user cache), start the engine process and wait for its READY handshake
(KV capacity), then log what was decided (model, dtype, device, KV capacity, attention backend, IR dispatch)
and the URL, and serve with uvicorn. Ctrl-C / SIGTERM stop uvicorn and then the engine process.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import signal
import socket
import threading
import time
from typing import Any

from treadle.serve_report import platform_report, startup_report

logger = logging.getLogger("treadle.serve")


def _defaults() -> dict[str, Any]:
    from treadle_engine_core.config import SchedulerConfig
    from treadle_frontend.server.config import ServerConfig
    from treadle_model_runner.config import CacheConfig, LoRAConfig, ModelConfig

    d: dict[str, Any] = {}
    for cfg in (ModelConfig(model=""), CacheConfig(), SchedulerConfig(), ServerConfig(), LoRAConfig()):
        for f in dataclasses.fields(cfg):
            d.setdefault(f.name, getattr(cfg, f.name))
    return d


def add_serve_args(p: argparse.ArgumentParser) -> None:
    from treadle_frontend.server.reply import REASONING_PARSERS
    from treadle_frontend.server.tool_calls import PARSERS as TOOL_CALL_PARSERS
    from treadle_model_runner.config import (
        ATTENTION_BACKENDS,
        DTYPES,
        KV_CACHE_DTYPES,
        LOAD_FORMATS,
        QUANTIZATIONS,
    )

    d = _defaults()
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="HF-format directory, .gguf file, or none for the embedded default",
    )
    p.add_argument("--model", dest="model_opt", default=None, help=argparse.SUPPRESS)
    p.add_argument("--host", default=d["host"], help=f"interface to bind (default {d['host']})")
    p.add_argument("--port", type=int, default=d["port"], help=f"port (default {d['port']})")
    p.add_argument("--api-key", default=d["api_key"], help="require this key on every /v1 route")
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="model id(s) clients send; responses carry the first (default: the model directory's name)",
    )
    p.add_argument(
        "--max-model-len", type=int, default=d["max_model_len"], help="context length (default: the model's)"
    )
    p.add_argument("--dtype", default=d["dtype"], choices=DTYPES)
    p.add_argument("--tokenizer", default=d["tokenizer"], help="tokenizer directory (default: the model's)")
    p.add_argument("--chat-template", default=d["chat_template"], help="Jinja chat template file or text")
    p.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="return the tool calls replies write as tool_calls (with --tool-call-parser)",
    )
    p.add_argument(
        "--tool-call-parser",
        choices=TOOL_CALL_PARSERS,
        default=None,
        help="how replies write tool calls",
    )
    p.add_argument(
        "--reasoning-parser",
        choices=REASONING_PARSERS,
        default=None,
        help="return a thinking model's reasoning (<think> block; gpt-oss's analysis channel) as reasoning_content",
    )
    p.add_argument(
        "--return-tokens-as-token-ids",
        action="store_true",
        default=d["return_tokens_as_token_ids"],
        help='name logprob tokens "token_id:{id}" (a request\'s return_tokens_as_token_ids overrides it)',
    )
    p.add_argument(
        "--generation-config",
        default=d["generation_config"],
        help="auto: the model's generation_config.json defaults | none | a directory",
    )
    p.add_argument("--max-num-seqs", type=int, default=d["max_num_seqs"])
    p.add_argument("--max-num-batched-tokens", type=int, default=d["max_num_batched_tokens"])
    p.add_argument("--gpu-memory-utilization", type=float, default=d["gpu_memory_utilization"])
    p.add_argument("--kv-cache-space", type=float, default=d["kv_cache_space"], help="GiB of KV cache on CPU")
    p.add_argument(
        "--kv-cache-dtype", default=d["kv_cache_dtype"], choices=KV_CACHE_DTYPES,
        help="auto: the model dtype; fp8 (= fp8_e4m3) / fp8_e5m2: 8-bit K/V at unit scale. On Hopper with "
        "flashinfer-python, fp8 decode runs FlashInfer's XQA kernel (query and softmax weights in e4m3 too; "
        "TREADLE_ATTN_XQA=0 keeps Triton's)",
    )  # fmt: skip
    p.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=d["enable_prefix_caching"]
    )
    p.add_argument("--scheduling-policy", default=d["policy"], choices=["fcfs", "priority"])
    p.add_argument("--block-size", type=int, default=d["block_size"], help="tokens per KV-cache block")
    p.add_argument("--num-gpu-blocks-override", type=int, default=None, help="fix the KV-cache block count")
    p.add_argument(
        "--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=d["enable_chunked_prefill"]
    )
    p.add_argument("--long-prefill-token-threshold", type=int, default=d["long_prefill_token_threshold"])
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument(
        "--enable-expert-parallel", action="store_true", default=d["enable_expert_parallel"],
        help="MoE models with --tensor-parallel-size > 1: each GPU holds whole experts (E / tp of them) instead of a "
        "slice of every expert",
    )  # fmt: skip
    p.add_argument("--enable-lora", action="store_true", default=d["enable_lora"], help="serve LoRA adapters")
    p.add_argument(
        "--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
        help='LoRA adapters (PEFT directories) served as models: name=path, or JSON {"name", "path", '
        '"base_model_name"}; a request\'s "model" picks one',
    )  # fmt: skip
    p.add_argument("--max-loras", type=int, default=d["max_loras"], help="most distinct adapters in one step")
    p.add_argument(
        "--max-lora-rank", type=int, default=d["max_lora_rank"], help="largest adapter rank accepted"
    )
    p.add_argument(
        "--max-cpu-loras", type=int, default=d["max_cpu_loras"],
        help="adapters kept loaded in host memory (default: --max-loras)",
    )  # fmt: skip
    # vLLM flags treadle accepts so that vLLM command lines run, refusing values it cannot honour
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, help="1 only (use -tp)")
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="engine processes, each a whole model on its own GPU(s) (x tensor_parallel_size)")  # fmt: skip
    p.add_argument(
        "--quantization", "-q", default=d["quantization"],
        help=f"{' | '.join(QUANTIZATIONS)} | none (default). fp8 on an unquantized model: each dense projection to "
        "float8_e4m3fn at load, one scale per output channel; activations per token; embedding and lm_head kept. "
        "fp8 checkpoints (compressed-tensors, quant_method fp8) and 4-bit ones (awq, gptq, compressed-tensors W4A16) "
        "are detected from config.json and load as they are (with none, their own method name, or fp8 for fp8 ones)",
    )  # fmt: skip
    p.add_argument(
        "--trust-remote-code", action="store_true", help="accepted; treadle never runs a model's code"
    )
    p.add_argument(
        "--max-logprobs",
        type=int,
        default=d["max_logprobs"],
        help=f"most logprobs / top_logprobs / prompt_logprobs a request may ask for (default {d['max_logprobs']}; "
        "-1: no limit, the whole vocabulary)",
    )
    p.add_argument(
        "--pooler-config", default=None, metavar="JSON",
        help='how /v1/embeddings pools the prompt (vLLM\'s): {"pooling_type": "LAST" | "MEAN" | "CLS", '
        '"normalize": true | false} (default: LAST, normalized)',
    )  # fmt: skip
    p.add_argument(
        "--hf-overrides", default=None, metavar="JSON",
        help="config.json fields to replace (vLLM's), e.g. a longer context by YaRN: "
        '\'{"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, '
        '"rope_theta": 1000000}}\' --max-model-len 131072',
    )  # fmt: skip
    p.add_argument(
        "--speculative-config", default=None, metavar="JSON",
        help='speculative decoding (vLLM\'s): {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, '
        '"prompt_lookup_min": 2}, or a draft model sharing the tokenizer: '
        '{"model": "DIR", "num_speculative_tokens": 4} (default: no speculation)',
    )  # fmt: skip
    p.add_argument("--root-path", default="", help="path prefix when served behind a path-based proxy")
    p.add_argument("--ssl-keyfile", default=None)
    p.add_argument("--ssl-certfile", default=None)
    p.add_argument("--allowed-origins", type=json.loads, default=list(d["allowed_origins"]), help="JSON list")
    p.add_argument("--allowed-methods", type=json.loads, default=list(d["allowed_methods"]), help="JSON list")
    p.add_argument("--allowed-headers", type=json.loads, default=list(d["allowed_headers"]), help="JSON list")
    p.add_argument("--allow-credentials", action="store_true", default=d["allow_credentials"])
    p.add_argument("--enforce-eager", action="store_true", default=d["enforce_eager"])
    p.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="schedule step N+1 while step N runs (default: on with CUDA, off on CPU)",
    )
    p.add_argument("--load-format", default=d["load_format"], choices=LOAD_FORMATS)
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--attention-backend", default=d["attention_backend"], choices=ATTENTION_BACKENDS)
    p.add_argument(
        "--ir-op-priority",
        default=None,
        help='per-op provider order, e.g. "rms_norm=triton,native;silu_and_mul=native"',
    )
    p.add_argument("--disable-log-stats", action="store_true", default=d["disable_log_stats"])
    p.add_argument(
        "--uvicorn-log-level",
        default=d["uvicorn_log_level"],
        choices=["critical", "error", "warning", "info", "debug", "trace"],
    )


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.pipeline_parallel_size != 1:
        raise ValueError(
            f"pipeline_parallel_size {args.pipeline_parallel_size} is not supported; split a model across GPUs with "
            "--tensor-parallel-size"
        )
    if args.lora_modules and not args.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    return {
        "block_size": args.block_size,
        "num_gpu_blocks_override": args.num_gpu_blocks_override,
        "enable_chunked_prefill": args.enable_chunked_prefill,
        "long_prefill_token_threshold": args.long_prefill_token_threshold,
        "tokenizer": args.tokenizer,
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "max_logprobs": args.max_logprobs,
        "quantization": None if args.quantization in (None, "none") else args.quantization,
        "pooler_config": args.pooler_config,
        "hf_overrides": args.hf_overrides,
        "speculative_config": args.speculative_config,
        "load_format": args.load_format,
        "seed": args.seed,
        "served_model_name": args.served_model_name[0] if args.served_model_name else None,
        "attention_backend": args.attention_backend,
        "enforce_eager": args.enforce_eager,
        "async_scheduling": args.async_scheduling,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "kv_cache_space": args.kv_cache_space,
        "kv_cache_dtype": args.kv_cache_dtype,
        "enable_prefix_caching": args.enable_prefix_caching,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "scheduling_policy": args.scheduling_policy,
        "tensor_parallel_size": args.tensor_parallel_size,
        "enable_expert_parallel": args.enable_expert_parallel,
        "data_parallel_size": args.data_parallel_size,
        "enable_lora": args.enable_lora,
        "max_loras": args.max_loras,
        "max_lora_rank": args.max_lora_rank,
        "max_cpu_loras": args.max_cpu_loras,
        "chat_template": args.chat_template,
        "generation_config": args.generation_config,
        "log_stats": True,
    }


def _apply_ir_priority(spec: str | None) -> None:
    """--ir-op-priority goes to the engine process through TREADLE_IR_OP_PRIORITY (read by treadle_ir)."""
    if spec:
        import os

        os.environ["TREADLE_IR_OP_PRIORITY"] = spec


def _import_web_stack() -> None:
    import uvicorn  # noqa: F401

    import treadle_frontend.async_llm
    import treadle_frontend.server.app  # noqa: F401


def make_server_config(args: argparse.Namespace, model: str | None) -> Any:
    """The ServerConfig of `treadle serve` from its flags and the model argument."""
    from treadle_frontend.server.config import ServerConfig
    from treadle_frontend.server.lora import parse_lora_modules

    names = args.served_model_name or []
    return ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        served_model_name=names[0] if names else None,
        more_model_names=tuple(names[1:]),
        # vLLM serves a model under its argument as given (a path): accept that id too, unless named explicitly
        model_aliases=(model,) if model and not names else (),
        chat_template=args.chat_template,
        generation_config=args.generation_config,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        uvicorn_log_level=args.uvicorn_log_level,
        disable_log_stats=args.disable_log_stats,
        allowed_origins=tuple(args.allowed_origins),
        allowed_methods=tuple(args.allowed_methods),
        allowed_headers=tuple(args.allowed_headers),
        allow_credentials=args.allow_credentials,
        lora_modules=parse_lora_modules(args.lora_modules),
    )


def run_serve(args: argparse.Namespace) -> int:
    from treadle_frontend.engine_factory import EngineArgs, start_async_mp

    t0 = time.monotonic()
    model = args.model or args.model_opt
    server_config = make_server_config(args, model)
    _apply_ir_priority(args.ir_op_priority)
    if args.trust_remote_code:
        logger.info(
            "--trust-remote-code changes nothing: treadle runs its own model code, never a checkpoint's"
        )
    engine_args = EngineArgs.from_kwargs(model, **engine_options(args))
    if args.chat_template:  # a file or template text: checked before the engine loads anything
        from treadle_frontend.tokenizer import resolve_chat_template

        resolve_chat_template(None, args.chat_template)
    sock = listen_socket(args.host, args.port)  # first: a taken port fails at once, not after loading
    # the web stack (FastAPI, pydantic, uvicorn: ~1 s of imports) loads while the engine process boots
    web = threading.Thread(target=_import_web_stack, name="treadle-import-web", daemon=True)
    web.start()
    signals: list[int] = []  # a Ctrl-C / SIGTERM while starting: recorded, and raised as KeyboardInterrupt
    previous = {sig: signal.signal(sig, _interrupt(signals)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        client, processor = start_async_mp(engine_args)
        web.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if signals:  # the interrupt was swallowed somewhere while loading: never go on to serve
        client.shutdown()
        sock.close()
        return 130
    import uvicorn

    from treadle_frontend.async_llm import AsyncLLM
    from treadle_frontend.server import build_app

    llm = AsyncLLM(client, processor)
    # the platform lines, from a thread once the server is up; joined before this process exits: a daemon thread
    # still importing torch at interpreter exit can die inside C++ code and abort the process ("terminate called
    # without an active exception", seen once in four SIGINTs right after start-up on an H200 machine)
    report = threading.Thread(target=platform_report, args=(engine_args.model_config,), name="treadle-report")

    def on_ready() -> None:
        """Start-up done (the --lora-modules adapters loaded): say so, just before connections are accepted."""
        startup_report(llm, server_config.url, time.monotonic() - t0)
        if args.data_parallel_size > 1:
            logger.info("Data parallel: %d engine processes, each holding the whole model and its own KV cache "
                        "(the capacity above is one engine's)", args.data_parallel_size)  # fmt: skip
        report.start()

    try:
        app = build_app(llm, server_config, on_ready=on_ready)
        from treadle_engine_core.heap import freeze_startup_heap

        freeze_startup_heap("API server")
        config = uvicorn.Config(
            app, host=args.host, port=args.port, log_level=args.uvicorn_log_level, timeout_graceful_shutdown=5,
            root_path=args.root_path, ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
        )  # fmt: skip
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except SystemExit:  # uvicorn exits 3 when the app's start-up fails: a user error when we know why
            error = app.state.treadle.startup_error
            if error is not None:
                raise error from None
            raise
    finally:
        llm.shutdown()
        if report.is_alive():
            report.join()
        sock.close()
    return 0


def _interrupt(seen: list[int]) -> Any:
    def handler(signum: int, _frame: object) -> None:
        seen.append(signum)
        raise KeyboardInterrupt(f"signal {signum} during start-up")

    return handler


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), which uvicorn listens on once the engine is up. ValueError (the CLI's
    user-error exit) when the address is taken or cannot be bound."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)  # as uvicorn binds its own
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:  # also an unresolvable host (socket.gaierror)
        sock.close()
        taken = e.errno == errno.EADDRINUSE
        hint = " (another server is running there? pick one with --port)" if taken else ""
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}{hint}") from None
    return sock
