"""`LLM(..., tensor_parallel_size=2, enable_expert_parallel=True)` on CPU (gloo): the flag travels through the engine
to the worker process, so both ranks hold whole experts (a rank with sliced experts would sum partials of another
layout), and a tiny Qwen3-MoE with dummy weights gives the one-device engine's tokens and logprobs; the start-up
report says expert parallel."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import LLAMA
from test_tensor_parallel import ENGINE, _assert_same, _run

from treadle import LLM

QWEN3_MOE = {
    **{k: v for k, v in LLAMA.items() if k not in ("architectures", "model_type", "intermediate_size")},
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "head_dim": 16,
    "intermediate_size": 128,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "norm_topk_prob": True,
}


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("tiny_qwen3_moe")
    (model / "config.json").write_text(json.dumps(QWEN3_MOE))
    return model


def test_two_expert_parallel_ranks_equal_one_device(tiny_moe: Path) -> None:
    llm = LLM(str(tiny_moe), **ENGINE)
    try:
        want: list[Any] = _run(llm)
    finally:
        llm.shutdown()
    llm = LLM(str(tiny_moe), tensor_parallel_size=2, enable_expert_parallel=True, **ENGINE)
    try:
        assert "x 2 (tensor parallel + expert parallel)" in llm.engine_info()["device"]
        _assert_same(_run(llm), want)
    finally:
        llm.shutdown()
