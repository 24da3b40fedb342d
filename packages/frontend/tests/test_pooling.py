"""Embedding pooling options (vLLM's pooler_config): LAST, MEAN and CLS, normalized or not, checked against the
final hidden states of HF transformers' own run of a tiny random Llama built here, pooled by hand.

Prompts longer than max_num_batched_tokens (16) are prefilled in several steps (chunked prefill), so MEAN must add
up every chunk's positions and CLS keep the first chunk's first position; a prompt embedded again, or one sharing
a long prefix with an earlier one, must not read that prefix from the prefix cache (it would skip computing the
positions MEAN and CLS need). Offline through `LLM(pooler_config=...)`, and through the openai SDK's embeddings
call on a server started with the same option, where a request's `normalize` overrides the server's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from frontend_helpers import openai_client
from server_harness import ThreadedServer
from tiny_assets import build_tokenizer_dir

from treadle_model_runner.config import ModelConfig, PoolerConfig

CHUNK = 16  # max_num_batched_tokens: the engine computes at most this many prompt tokens a step
LONG = [(7 * i) % 390 + 5 for i in range(50)]  # four steps of prefill
PROMPTS = [LONG, LONG, [*LONG[:40], 11, 12, 13], [9, 8, 7]]  # again; a 40-token shared prefix; short
OPTIONS: dict[str, Any] = {"dtype": "float32", "kv_cache_space": 0.01, "max_num_batched_tokens": CHUNK}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """(the model directory, the HF model): a tiny random Llama and the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = build_tokenizer_dir(tmp_path_factory.mktemp("pooling_model"))
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=400, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=True,
    )  # fmt: skip
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(path, safe_serialization=True)
    return path, hf


def _expected(hf: Any, prompt: list[int], pooling_type: str, normalize: bool) -> list[float]:
    """HF's final hidden states of `prompt` (after the last norm), pooled and normalized by hand."""
    with torch.no_grad():
        states = hf.model(torch.tensor([prompt])).last_hidden_state[0].double()  # [len(prompt), hidden]
    vector = {"LAST": states[-1], "MEAN": states.sum(0) / len(prompt), "CLS": states[0]}[pooling_type]
    if normalize:
        vector = vector / vector.norm()
    return vector.tolist()


@pytest.mark.parametrize(("pooling_type", "normalize"), [("LAST", True), ("MEAN", False), ("CLS", True)])
def test_offline_pooling_matches_hf(model: tuple[Path, Any], pooling_type: str, normalize: bool) -> None:
    from treadle_frontend import LLM

    path, hf = model
    config = {"pooling_type": pooling_type, "normalize": normalize}
    llm = LLM(str(path), pooler_config=config, **OPTIONS)
    try:
        outs = llm.embed([{"prompt_token_ids": p} for p in PROMPTS], use_tqdm=False)
        again = llm.embed([{"prompt_token_ids": PROMPTS[2]}], use_tqdm=False)  # its prefix cached by now
    finally:
        llm.shutdown()
    for prompt, out in zip([*PROMPTS, PROMPTS[2]], [*outs, *again], strict=True):
        assert out.outputs.embedding == pytest.approx(
            _expected(hf, prompt, pooling_type, normalize), abs=2e-5
        )
    if pooling_type != "CLS":  # (a causal model's first state does not see what follows it)
        assert outs[0].outputs.embedding != pytest.approx(outs[2].outputs.embedding, abs=1e-3)


def test_per_call_pooling_params(model: tuple[Path, Any]) -> None:
    """vLLM's LLM.embed / LLM.score options: `pooling_params.normalize` overrides the engine's, and
    `truncate_prompt_tokens` (or the params' own) embeds each prompt's last N tokens."""
    from treadle_frontend import LLM, PoolingParams

    path, hf = model
    llm = LLM(str(path), pooler_config={"pooling_type": "MEAN"}, **OPTIONS)
    try:
        raw = llm.embed(
            [{"prompt_token_ids": LONG}], use_tqdm=False, pooling_params=PoolingParams(normalize=False)
        )
        cut = llm.embed({"prompt_token_ids": LONG}, use_tqdm=False, truncate_prompt_tokens=7)
        cut_params = llm.embed(LONG, use_tqdm=False, pooling_params=PoolingParams(truncate_prompt_tokens=7))
        scores = llm.score(
            "a b c", ["a b c", "x y"], use_tqdm=False, pooling_params=PoolingParams(normalize=False)
        )
        with pytest.raises(ValueError, match="truncate_prompt_tokens must be -1 or >= 1"):
            llm.embed(LONG, use_tqdm=False, truncate_prompt_tokens=0)
    finally:
        llm.shutdown()
    assert raw[0].outputs.embedding == pytest.approx(_expected(hf, LONG, "MEAN", False), abs=2e-5)
    assert cut[0].prompt_token_ids == LONG[-7:]
    assert cut[0].outputs.embedding == pytest.approx(_expected(hf, LONG[-7:], "MEAN", True), abs=2e-5)
    assert cut_params[0].outputs.embedding == cut[0].outputs.embedding
    assert scores[0].outputs.score == pytest.approx(1.0, abs=1e-6) and scores[1].outputs.score < 0.999
    with pytest.raises(ValueError, match="dimensions 8 is not supported"):
        PoolingParams(dimensions=8)


@pytest.fixture(scope="module")
def mean_server(model: tuple[Path, Any]) -> Iterator[openai.OpenAI]:
    """A server whose embeddings are MEAN-pooled and not normalized (its --pooler-config, as JSON text)."""
    from treadle_frontend.async_llm import AsyncLLM
    from treadle_frontend.engine_factory import EngineArgs, start_async_mp
    from treadle_frontend.server import ServerConfig, build_app

    path, _ = model
    pooler = '{"pooling_type": "MEAN", "normalize": false}'
    client, processor = start_async_mp(EngineArgs.from_kwargs(str(path), pooler_config=pooler, **OPTIONS))
    llm = AsyncLLM(client, processor)
    try:
        config = ServerConfig(host="127.0.0.1", served_model_name="tiny", disable_log_stats=True)
        with ThreadedServer(build_app(llm, config)) as server:
            yield openai_client(server.url)
    finally:
        llm.shutdown()


def test_embeddings_through_the_sdk(model: tuple[Path, Any], mean_server: openai.OpenAI) -> None:
    _, hf = model
    plain = mean_server.embeddings.create(model="tiny", input=PROMPTS, encoding_format="float")
    assert [d.index for d in plain.data] == [0, 1, 2, 3]
    assert plain.usage.prompt_tokens == sum(len(p) for p in PROMPTS)
    for prompt, data in zip(PROMPTS, plain.data, strict=True):
        assert data.embedding == pytest.approx(_expected(hf, prompt, "MEAN", False), abs=2e-5)
    unit = mean_server.embeddings.create(
        model="tiny", input=PROMPTS[2], encoding_format="float", extra_body={"normalize": True}
    )
    assert unit.data[0].embedding == pytest.approx(_expected(hf, PROMPTS[2], "MEAN", True), abs=2e-5)


def test_pooler_config_is_checked() -> None:
    assert ModelConfig(model="").pooler_config == PoolerConfig("LAST", True)
    parsed = ModelConfig(model="", pooler_config='{"pooling_type": "mean", "normalize": false}').pooler_config
    assert parsed == PoolerConfig("MEAN", False)
    for value, message in (
        ({"pooling_type": "ALL"}, "pools token by token"),
        ({"pooling_type": "MAX"}, r"'MAX' is not one of LAST, MEAN, CLS"),
        ({"dimensions": 8}, "'dimensions' not supported; its keys are pooling_type, normalize"),
        ({"normalize": "yes"}, "normalize must be true or false"),
        ("{pooling", "is not JSON"),
    ):
        with pytest.raises(ValueError, match=message):
            ModelConfig(model="", pooler_config=value)
