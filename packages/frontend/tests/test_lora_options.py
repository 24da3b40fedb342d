"""LoRA options of the frontend, without a model: --lora-modules forms, served-name clashes, the engine options
that reach LoRAConfig, and the offline LLM's per-prompt lora_request list (the adapters themselves run in the
end-to-end tests, tests/test_e2e_lora.py)."""

from __future__ import annotations

from typing import Any

import pytest

from treadle_frontend import LoRARequest
from treadle_frontend.engine_factory import EngineArgs
from treadle_frontend.server.config import ServerConfig
from treadle_frontend.server.lora import LoRAModule, parse_lora_modules
from treadle_model_runner.sampling_params import SamplingParams


def test_lora_modules_take_vllms_two_forms() -> None:
    poet = '{"name": "poet", "path": "/p", "base_model_name": "m"}'
    modules = parse_lora_modules(["sql=/adapters/sql", poet])
    assert modules == (LoRAModule("sql", "/adapters/sql"), LoRAModule("poet", "/p", "m"))
    for spec, message in (("sql", "is not name=path"), ("=/x", "is not name=path"),
                          ('{"name": "x"}', "needs \"name\" and \"path\"")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            parse_lora_modules([spec])
    with pytest.raises(ValueError, match="names each adapter once"):
        parse_lora_modules(["a=/x", "a=/y"])
    with pytest.raises(ValueError, match=r"LoRA adapter name\(s\) \['tiny'\] are also served model names"):
        ServerConfig(served_model_name="tiny", lora_modules=(LoRAModule("tiny", "/x"),))


def test_engine_options_reach_the_lora_config() -> None:
    args = EngineArgs.from_kwargs("m", enable_lora=True, max_loras=3, max_lora_rank=32, max_cpu_loras=4)
    lora = args.lora_config
    assert (lora.enable_lora, lora.max_loras, lora.max_lora_rank, lora.max_cpu_loras) == (True, 3, 32, 4)
    assert args.engine_config(args.model_config).lora_config == lora
    assert EngineArgs.from_kwargs("m").lora_config.enable_lora is False
    with pytest.raises(ValueError, match="max_cpu_loras \\(1\\) must be >= max_loras \\(2\\)"):
        EngineArgs.from_kwargs("m", enable_lora=True, max_loras=2, max_cpu_loras=1)


def test_one_lora_request_or_one_per_prompt(llm: Any) -> None:
    params = SamplingParams(max_tokens=2)
    one = LoRARequest("a", 1, "/adapters/a")
    with pytest.raises(ValueError, match="got 1 lora requests for 2 prompts"):
        llm.generate(["Hi", "Ho"], params, use_tqdm=False, lora_request=[one])
    with pytest.raises(TypeError, match="lora_request must be a LoRARequest or a list of them"):
        llm.generate(["Hi"], params, use_tqdm=False, lora_request="a")
    assert len(llm.generate(["Hi", "Ho"], params, use_tqdm=False, lora_request=[None, None])) == 2
