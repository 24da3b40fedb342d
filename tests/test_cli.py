"""The `treadle` CLI: serve flags default to the config dataclasses, and map onto engine options."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from treadle import cli, cli_serve, serve_report
from treadle_engine_core.config import SchedulerConfig
from treadle_frontend import engine_factory
from treadle_frontend.engine_factory import EngineArgs
from treadle_frontend.server.config import ServerConfig
from treadle_model_runner.config import CacheConfig, ModelConfig


def test_serve_defaults_come_from_the_dataclasses() -> None:
    args = cli.build_parser().parse_args(["serve"])
    model, cache, sched, server = ModelConfig(model=""), CacheConfig(), SchedulerConfig(), ServerConfig()
    assert args.model is None
    assert (args.host, args.port, args.api_key, args.uvicorn_log_level) == (
        server.host,
        server.port,
        server.api_key,
        server.uvicorn_log_level,
    )
    assert (args.dtype, args.max_model_len, args.load_format, args.seed, args.attention_backend) == (
        model.dtype,
        model.max_model_len,
        model.load_format,
        model.seed,
        model.attention_backend,
    )
    assert (
        args.gpu_memory_utilization,
        args.kv_cache_space,
        args.enable_prefix_caching,
        args.kv_cache_dtype,
    ) == (
        cache.gpu_memory_utilization,
        cache.kv_cache_space,
        cache.enable_prefix_caching,
        cache.kv_cache_dtype,
    )
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.scheduling_policy) == (
        sched.max_num_seqs,
        sched.max_num_batched_tokens,
        sched.policy,
    )


def test_serve_flags_reach_the_configs() -> None:
    args = cli.build_parser().parse_args(
        [
            "serve",
            "some/dir",
            "--max-model-len",
            "512",
            "--no-enable-prefix-caching",
            "--max-num-seqs",
            "7",
            "--scheduling-policy",
            "priority",
            "--load-format",
            "dummy",
            "--kv-cache-space",
            "0.5",
            "--kv-cache-dtype",
            "fp8",
            "-tp",
            "1",
            "--enforce-eager",
            "--served-model-name",
            "m",
            "--generation-config",
            "none",
        ]
    )
    ea = EngineArgs.from_kwargs(args.model, **cli_serve.engine_options(args))
    assert ea.model_config.model == "some/dir" and ea.model_config.max_model_len == 512
    assert ea.model_config.load_format == "dummy" and ea.model_config.enforce_eager
    assert ea.model_config.served_model_name == "m" and ea.generation_config == "none"
    assert not ea.cache_config.enable_prefix_caching and ea.cache_config.kv_cache_space == 0.5
    assert ea.cache_config.kv_cache_dtype == "fp8"
    assert ea.scheduler_config.max_num_seqs == 7 and ea.scheduler_config.policy == "priority"
    assert ea.scheduler_config.max_model_len == 512


def test_enable_expert_parallel_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--help"])
    assert "--enable-expert-parallel" in capsys.readouterr().out
    for flags, expected in (([], False), (["-tp", "2", "--enable-expert-parallel"], True)):
        args = cli.build_parser().parse_args(["serve", "d", *flags])
        ea = EngineArgs.from_kwargs(args.model, **cli_serve.engine_options(args))
        assert ea.model_config.enable_expert_parallel is expected
    # the offline API: LLM(..., enable_expert_parallel=True) passes its keywords through EngineArgs.from_kwargs
    ea = EngineArgs.from_kwargs("d", tensor_parallel_size=2, enable_expert_parallel=True)
    assert ea.model_config.enable_expert_parallel and ea.model_config.tensor_parallel_size == 2


def test_vllm_flags_reach_the_configs_or_are_refused() -> None:
    argv = ["serve", "d", "--block-size", "32", "--num-gpu-blocks-override", "100", "--no-enable-chunked-prefill",
            "--max-num-batched-tokens", "4096", "--max-model-len", "512", "--long-prefill-token-threshold", "64",
            "--trust-remote-code", "--max-logprobs", "5", "--allowed-origins", '["http://a.example"]',
            "--allow-credentials", "-pp", "1", "-dp", "2"]  # fmt: skip
    args = cli.build_parser().parse_args(argv)
    ea = EngineArgs.from_kwargs(args.model, **cli_serve.engine_options(args))
    assert (ea.cache_config.block_size, ea.cache_config.num_gpu_blocks_override) == (32, 100)
    assert ea.data_parallel_size == 2 and ea.engine_config(ea.model_config).data_parallel_size == 2
    assert (
        not ea.scheduler_config.enable_chunked_prefill
        and ea.scheduler_config.long_prefill_token_threshold == 64
    )
    server = cli_serve.make_server_config(args, args.model)
    assert ea.model_config.max_logprobs == 5  # an engine option, as in vLLM: the engine core checks it too
    assert server.allowed_origins == ("http://a.example",) and server.allow_credentials
    for flags, message in ((["-pp", "2"], "pipeline_parallel_size 2 is not supported"),):
        with pytest.raises(ValueError, match=message):
            cli_serve.engine_options(cli.build_parser().parse_args(["serve", *flags]))
    for flags, method in ((["--quantization", "fp8"], "fp8"), (["-q", "fp8"], "fp8"), (["-q", "none"], None)):
        options = cli_serve.engine_options(cli.build_parser().parse_args(["serve", *flags]))
        assert EngineArgs.from_kwargs(None, **options).model_config.quantization == method
    with pytest.raises(ValueError, match=r"quantization 'bitsandbytes' is not supported; supported: fp8"):
        EngineArgs.from_kwargs(
            None, **cli_serve.engine_options(cli.build_parser().parse_args(["serve", "-q", "bitsandbytes"]))
        )
    for value, limit in (("21", 21), ("-1", -1)):  # above vLLM's default of 20, and no limit at all
        options = cli_serve.engine_options(cli.build_parser().parse_args(["serve", "--max-logprobs", value]))
        assert EngineArgs.from_kwargs(None, **options).model_config.max_logprobs == limit
    with pytest.raises(ValueError, match=r"max_logprobs must be an integer >= -1 \(-1: no limit"):
        EngineArgs.from_kwargs(
            None, **cli_serve.engine_options(cli.build_parser().parse_args(["serve", "--max-logprobs", "-2"]))
        )


def test_pooler_config_flag() -> None:
    """--pooler-config takes vLLM's JSON; a key or pooling type it cannot honour is an error naming it."""
    from treadle_model_runner.config import PoolerConfig

    def parsed(*flags: str) -> PoolerConfig:
        options = cli_serve.engine_options(cli.build_parser().parse_args(["serve", *flags]))
        return EngineArgs.from_kwargs(None, **options).model_config.pooler_config

    assert parsed() == PoolerConfig("LAST", True)
    assert parsed("--pooler-config", '{"pooling_type": "MEAN", "normalize": false}') == PoolerConfig(
        "MEAN", False
    )
    assert parsed("--pooler-config", '{"pooling_type": "CLS"}') == PoolerConfig("CLS", True)
    with pytest.raises(ValueError, match="'softmax' not supported; its keys are pooling_type, normalize"):
        parsed("--pooler-config", '{"softmax": true}')
    with pytest.raises(ValueError, match="'STEP' pools token by token"):
        parsed("--pooler-config", '{"pooling_type": "STEP"}')


def test_bad_option_and_version(capsys: object) -> None:
    with pytest.raises(ValueError, match="unknown engine option 'max_num_seq'"):
        EngineArgs.from_kwargs(None, max_num_seq=3)
    with pytest.raises(
        ValueError, match=r"kv_cache_dtype 'int8' is not one of auto, fp8, fp8_e4m3, fp8_e5m2"
    ):
        EngineArgs.from_kwargs(None, kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1, got 0"):
        EngineArgs.from_kwargs(None, tensor_parallel_size=0)
    assert EngineArgs.from_kwargs(None, tensor_parallel_size=2).model_config.tensor_parallel_size == 2
    assert cli.main(["--version"]) == 0


def test_serve_on_a_taken_port_fails_before_loading_anything(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The listening socket is bound before the engine starts: a taken port is a one-line error at once, not a
    "ready" log after the model loaded and then a crash. A bad --chat-template is checked before it too."""
    monkeypatch.setattr(engine_factory, "start_async_mp", lambda *a: pytest.fail("the engine started"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--host", "127.0.0.1", "--port", str(port), "--load-format", "dummy"]) == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in caplog.text
    bad_template = ["serve", "--port", "0", "--load-format", "dummy", "--chat-template", "no/such/file.jinja"]
    assert cli.main(bad_template) == 2  # also before the engine
    assert "--chat-template 'no/such/file.jinja' is neither an existing file" in caplog.text
    free = cli_serve.listen_socket("127.0.0.1", 0)  # a free port binds; uvicorn listens on it later
    assert free.getsockname()[0] == "127.0.0.1"
    free.close()


@pytest.mark.parametrize("interrupted", [False, True])
def test_engine_start_failure_is_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, interrupted: bool
) -> None:
    """The engine logged its own details; the CLI says what failed in one line (exit 1), or nothing after a
    Ctrl-C during start-up (exit 130), and never serves."""
    from treadle_engine_core.client import EngineStartError

    def fail(*_: object) -> None:
        raise EngineStartError("engine core failed to start: OSError: disk on fire", interrupted)

    monkeypatch.setattr(engine_factory, "start_async_mp", fail)
    rc = cli.main(["serve", "--host", "127.0.0.1", "--port", "0", "--load-format", "dummy"])
    assert rc == (130 if interrupted else 1)
    assert ("engine core failed to start: OSError: disk on fire" in caplog.text) != interrupted


def test_chat_client_when_the_server_is_down_and_key_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """With --model-name (no /models probe) a down server is the same one-line message, not a traceback; the
    key falls back to $OPENAI_API_KEY as vLLM's chat client's does."""
    from treadle import cli_chat

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    for command in ("chat", "complete"):
        with pytest.raises(SystemExit, match="cannot reach the server at"):
            cli.main([command, "--url", url, "--model-name", "x", "-q", "hi"])
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    args = cli.build_parser().parse_args(["chat", "--url", url, "--model-name", "x"])
    assert cli_chat._Client(args).http.headers["Authorization"] == "Bearer sk-env"
    args = cli.build_parser().parse_args(["chat", "--url", url, "--model-name", "x", "--api-key", "sk-flag"])
    assert cli_chat._Client(args).http.headers["Authorization"] == "Bearer sk-flag"


def test_served_model_id_also_accepts_the_model_argument() -> None:
    """vLLM serves `treadle serve /path/to/model` as the id "/path/to/model": that id is accepted beside the
    directory's name, unless --served-model-name names it."""
    from treadle_frontend.server.common import ServerState
    from treadle_frontend.server.errors import APIError

    args = cli.build_parser().parse_args(["serve", "/models/tiny"])
    config = cli_serve.make_server_config(args, args.model)
    assert config.model_aliases == ("/models/tiny",)
    state = ServerState(llm=None, config=config, model_name="tiny", metrics=None)  # type: ignore[arg-type]
    state.check_model("tiny")
    state.check_model("/models/tiny")
    with pytest.raises(APIError, match="does not exist"):
        state.check_model("other")
    named = cli.build_parser().parse_args(["serve", "/models/tiny", "--served-model-name", "mine"])
    assert cli_serve.make_server_config(named, named.model).model_aliases == ()
    several = cli.build_parser().parse_args(["serve", "/models/tiny", "--served-model-name", "a", "b/c"])
    config = cli_serve.make_server_config(several, several.model)
    assert (config.served_model_name, config.more_model_names, config.model_aliases) == ("a", ("b/c",), ())
    assert cli_serve.engine_options(several)["served_model_name"] == "a"


def test_tool_call_flags() -> None:
    args = cli.build_parser().parse_args(
        ["serve", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    )
    config = cli_serve.make_server_config(args, None)
    assert config.enable_auto_tool_choice and config.tool_call_parser == "hermes"
    thinking = cli.build_parser().parse_args(["serve", "--reasoning-parser", "qwen3"])
    assert cli_serve.make_server_config(thinking, None).reasoning_parser == "qwen3"
    alone = cli.build_parser().parse_args(["serve", "--enable-auto-tool-choice"])
    with pytest.raises(ValueError, match="needs --tool-call-parser"):
        cli_serve.make_server_config(alone, None)
    # gpt-oss's harmony format, under vLLM's names: every parser the frontend has is a choice
    harmony = cli.build_parser().parse_args(
        [
            "serve",
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            "openai",
            "--reasoning-parser",
            "openai_gptoss",
        ]
    )
    config = cli_serve.make_server_config(harmony, None)
    assert (config.tool_call_parser, config.reasoning_parser) == ("openai", "openai_gptoss")


def test_return_tokens_as_token_ids_flag() -> None:
    default = cli.build_parser().parse_args(["serve"])
    assert cli_serve.make_server_config(default, None).return_tokens_as_token_ids is False
    flagged = cli.build_parser().parse_args(["serve", "--return-tokens-as-token-ids"])
    assert cli_serve.make_server_config(flagged, None).return_tokens_as_token_ids is True


def test_start_up_report_names_a_checkpoints_quantization(tmp_path: Path) -> None:
    """The platform line says what the engine will load: the option asked for, else the checkpoint's own."""
    (tmp_path / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "compressed-tensors"}})
    )
    assert serve_report.quantization_label(ModelConfig(str(tmp_path))) == "compressed-tensors checkpoint"
    assert serve_report.quantization_label(ModelConfig(str(tmp_path), quantization="fp8")) == "fp8"
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert serve_report.quantization_label(ModelConfig(str(tmp_path))) == "none"
    assert serve_report.quantization_label(ModelConfig(str(tmp_path / "missing"))) == "none"


def test_speculative_config_flag(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """--speculative-config takes vLLM's JSON (serve and the offline benchmarks); bad JSON or an unknown key fail
    in one line before the engine starts, --async-scheduling with it is accepted; `LLM(speculative_config=...)`
    takes a dict or a SpeculativeConfig."""
    from treadle.bench import offline
    from treadle_model_runner.config import SpeculativeConfig

    def parsed(*flags: str) -> EngineArgs:
        options = cli_serve.engine_options(cli.build_parser().parse_args(["serve", *flags]))
        return EngineArgs.from_kwargs(None, **options)

    assert parsed().speculative_config is None
    want = SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_min=2, prompt_lookup_max=4)
    flag = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'
    args = parsed("--speculative-config", flag)
    assert args.speculative_config == want
    assert args.engine_config(args.model_config).speculative_config == want
    assert EngineArgs.from_kwargs(None, speculative_config=want).speculative_config == want
    assert EngineArgs.from_kwargs(None, speculative_config={"prompt_lookup_max": 3}).speculative_config == (
        SpeculativeConfig(prompt_lookup_min=3, prompt_lookup_max=3)
    )
    with pytest.raises(ValueError, match=r"speculative_config '\{ngram\}' is not JSON"):
        parsed("--speculative-config", "{ngram}")
    with pytest.raises(
        ValueError, match=r"'draft_model' not supported; its keys are method, num_speculative_tokens"
    ):
        parsed("--speculative-config", '{"method": "ngram", "draft_model": "x"}')
    both = parsed("--speculative-config", "{}", "--async-scheduling")
    assert both.speculative_config == SpeculativeConfig() and both.scheduler_config.async_scheduling is True
    assert (
        parsed("--speculative-config", "{}", "--no-async-scheduling").speculative_config
        == SpeculativeConfig()
    )
    monkeypatch.setattr(engine_factory, "start_async_mp", lambda *a: pytest.fail("the engine started"))
    argv = ["serve", "--port", "0", "--load-format", "dummy", "--speculative-config", '{"method": "medusa"}']
    assert cli.main(argv) == 2
    assert "speculative_config method 'medusa' is not supported; supported: ngram" in caplog.text
    bench = cli.build_parser().parse_args(["bench", "throughput", "--speculative-config", flag])
    captured: dict[str, object] = {}
    monkeypatch.setattr("treadle_frontend.LLM", lambda **kw: captured.update(kw))
    offline.make_llm(bench)
    assert captured["speculative_config"] == flag


def test_speculative_config_draft_model_fields() -> None:
    """vLLM's draft-model form: a `model` alone means method draft_model; each half without the other fails by
    name before anything starts."""
    from treadle_engine_core.core import describe_speculation
    from treadle_model_runner.config import SpeculativeConfig

    def parsed(value: str) -> SpeculativeConfig | None:
        options = cli_serve.engine_options(
            cli.build_parser().parse_args(["serve", "--speculative-config", value])
        )
        return EngineArgs.from_kwargs(None, **options).speculative_config

    assert parsed('{"model": "/d", "num_speculative_tokens": 3}') == SpeculativeConfig(
        method="draft_model", model="/d", num_speculative_tokens=3
    )
    assert parsed("{}") == SpeculativeConfig(method="ngram")
    assert describe_speculation(parsed('{"model": "/d"}')) == "draft_model (/d, num_speculative_tokens=5)"
    with pytest.raises(ValueError, match="method 'draft_model' needs a model"):
        parsed('{"method": "draft_model"}')
    with pytest.raises(ValueError, match="model '/d' is for method 'draft_model', not 'ngram'"):
        parsed('{"method": "ngram", "model": "/d"}')
    with pytest.raises(ValueError, match="model must be a path, got 3"):
        parsed('{"model": 3}')


def test_start_up_report_names_speculative_decoding(caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    caplog.set_level("INFO")
    info = SimpleNamespace(name="m", path="/m", max_model_len=64, kv_capacity_tokens=128, runtime={})
    serve_report.startup_report(SimpleNamespace(model=info), "http://h", 1.0)
    assert "Speculative decoding" not in caplog.text
    info.runtime["speculative_decoding"] = (
        "ngram (num_speculative_tokens=5, prompt_lookup_min=4, prompt_lookup_max=4)"
    )
    serve_report.startup_report(SimpleNamespace(model=info), "http://h", 1.0)
    assert "Speculative decoding: ngram (num_speculative_tokens=5, prompt_lookup_min=4" in caplog.text


def test_hf_overrides_flag_reaches_the_model_config() -> None:
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6}

    def overrides(*flags: str) -> object:
        args = cli.build_parser().parse_args(["serve", "d", *flags])
        return EngineArgs.from_kwargs(args.model, **cli_serve.engine_options(args)).model_config.hf_overrides

    assert overrides("--hf-overrides", json.dumps({"rope_parameters": yarn})) == {"rope_parameters": yarn}
    assert overrides() is None
