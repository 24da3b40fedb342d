"""LoRA end to end on a tiny random Llama with two PEFT adapters: the offline LLM (in-process and with its engine
in a process of its own) gives PEFT's greedy continuations for a list mixing the base model and both adapters, even
with one adapter slot (max_loras=1); a bad adapter fails its request; `treadle serve --enable-lora --lora-modules`
lists the adapters and runs the one a request's `model` names, through the real openai SDK, and a bad one stops
the server before it serves.

E2E_LORA_PORT pins the servers' port (default: a free one).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from e2e_helpers import API_KEY, MODEL_NAME, RealServer, start_server
from lora_e2e_assets import ADAPTER_OF, ENGINE, GREEDY, PROMPTS, Tiny, build_tiny

from treadle import LLM, BeamSearchParams, LoRARequest

PORT = int(os.environ.get("E2E_LORA_PORT", "0")) or None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return build_tiny(tmp_path_factory.mktemp("lora_e2e"))


def _generate(llm: LLM, tiny: Tiny) -> list[list[int]]:
    prompts: list[Any] = [{"prompt_token_ids": p} for p in PROMPTS]
    outs = llm.generate(prompts, GREEDY, lora_request=[tiny.request(a) for a in ADAPTER_OF])
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("engine_process", [False, True], ids=["inproc", "engine_process"])
def test_llm_runs_base_and_adapters_through_one_slot(tiny: Tiny, engine_process: bool) -> None:
    llm = LLM(str(tiny.model), engine_process=engine_process, enable_lora=True, max_loras=1, max_lora_rank=8,
              **ENGINE)  # fmt: skip
    try:
        got = _generate(llm, tiny)
        embedded = llm.embed([{"prompt_token_ids": PROMPTS[3]}], lora_request=tiny.request("poet"))
        # LLM.score embeds both texts under the adapter it is given
        pair = ("a b c", "a b d")
        scored = [llm.score(*pair, lora_request=r)[0].outputs.score for r in (None, tiny.request("poet"))]
        under = [o.outputs.embedding for o in llm.embed(list(pair), lora_request=tiny.request("poet"))]
        # beam search runs every step under the adapter: one beam is the adapter's greedy continuation
        beam = llm.beam_search([{"prompt_token_ids": PROMPTS[1]}], BeamSearchParams(1, max_tokens=8, ignore_eos=True),
                               lora_request=tiny.request("sql"))  # fmt: skip
        # or one adapter per prompt (vLLM's list form), the base model among them
        beams = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS[:3]],
                                BeamSearchParams(1, max_tokens=8, ignore_eos=True),
                                lora_request=[tiny.request(a) for a in ADAPTER_OF[:3]])  # fmt: skip
        with pytest.raises(ValueError, match="is not a directory"):
            llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY,
                         lora_request=LoRARequest("missing", 9, str(tiny.model / "no-such-adapter")))  # fmt: skip
    finally:
        llm.shutdown()
    want = [tiny.peft.greedy(a, p, 8) for p, a in zip(PROMPTS, ADAPTER_OF, strict=True)]
    assert got == want
    assert got[0] != got[1] != got[2]  # the adapters change the continuations
    assert beam[0].sequences[0].tokens == PROMPTS[1] + want[1]
    assert [b.sequences[0].tokens for b in beams] == [
        p + w for p, w in zip(PROMPTS[:3], want[:3], strict=True)
    ]
    poet = tiny.peft.embedding("poet", PROMPTS[3]).tolist()
    cosine = sum(a * b for a, b in zip(*under, strict=True)) / math.prod(math.hypot(*v) for v in under)
    assert scored[1] == pytest.approx(cosine, abs=1e-6) and scored[1] != pytest.approx(scored[0], abs=1e-6)
    assert embedded[0].outputs.embedding == pytest.approx(poet, abs=1e-4)


# ---- the server --------------------------------------------------------------------------------------------------
def _serve_args(tiny: Tiny, *modules: str) -> list[str]:
    return ["--load-format", "auto", "--dtype", "float32", "--enable-lora", "--max-loras", "2",
            "--max-lora-rank", "8", "--lora-modules", *modules]  # fmt: skip


def test_a_bad_adapter_stops_the_server_before_it_serves(tiny: Tiny, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"r": 64, "lora_alpha": 8}))
    # the CLI's user-error exit, with the entry named on the last line
    message = rf"exited with 2[\s\S]*--lora-modules bad={bad}: .*LoRA rank 64 is greater than max_lora_rank 8; .*\(--max-lora-rank\)\n$"
    with pytest.raises(RuntimeError, match=message):
        start_server(tiny.model, tmp_path / "server.log", _serve_args(tiny, f"bad={bad}"), port=PORT).stop()


@pytest.fixture(scope="module")
def lora_server(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    # vLLM's JSON form; a base_model_name the server does not serve leaves the parent the served model
    poet = json.dumps({"name": "poet", "path": str(tiny.adapters["poet"]), "base_model_name": "not-served"})
    extra = _serve_args(tiny, f"sql={tiny.adapters['sql']}", poet)
    os.environ["TREADLE_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    try:
        server = start_server(tiny.model, tmp_path_factory.mktemp("logs") / "server.log", extra, port=PORT)
    finally:
        del os.environ["TREADLE_ALLOW_RUNTIME_LORA_UPDATING"]
    try:
        yield server
    finally:
        server.stop()


def test_server_selects_the_adapter_by_model(tiny: Tiny, lora_server: RealServer) -> None:
    client = openai.OpenAI(base_url=lora_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == [MODEL_NAME, "sql", "poet"]
    assert models["sql"].model_extra == {**models["sql"].model_extra, "parent": MODEL_NAME,
                                         "root": str(tiny.adapters["sql"])}  # fmt: skip
    assert getattr(client.models.retrieve("poet"), "parent", None) == MODEL_NAME
    for model, adapter in ((MODEL_NAME, None), ("sql", "sql"), ("poet", "poet")):
        out = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
        assert out.model == model
        assert out.choices[0].model_extra["token_ids"] == tiny.peft.greedy(adapter, PROMPTS[1], 8), model
    for model, adapter in ((MODEL_NAME, None), ("poet", "poet")):  # pooling runs under the adapter too
        embedding = client.embeddings.create(model=model, input=[PROMPTS[3]], encoding_format="float")
        assert embedding.model == model
        want = tiny.peft.embedding(adapter, PROMPTS[3]).tolist()
        assert embedding.data[0].embedding == pytest.approx(want, abs=1e-4), model
    beam = client.completions.create(model="sql", prompt=PROMPTS[1], max_tokens=8, n=1,
                                     extra_body={"use_beam_search": True, "ignore_eos": True,
                                                 "return_token_ids": True})  # fmt: skip
    assert beam.choices[0].model_extra["token_ids"] == tiny.peft.greedy("sql", PROMPTS[1], 8)
    hi: Any = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="poet", messages=hi, max_tokens=3)
    assert chat.model == "poet" and chat.usage is not None and chat.usage.completion_tokens >= 1
    with pytest.raises(openai.NotFoundError, match="The model `nope` does not exist"):
        client.completions.create(model="nope", prompt="hi", max_tokens=1)
    # every route answers with the adapter's name: Anthropic's messages (whole and streamed) and Responses
    claude = anthropic.Anthropic(base_url=lora_server.url, api_key=API_KEY, max_retries=0, timeout=60)
    kw: dict[str, Any] = dict(model="sql", max_tokens=3, messages=hi, extra_body={"temperature": 0})
    assert claude.messages.create(**kw).model == "sql"
    events = list(claude.messages.create(stream=True, **kw))
    assert events[0].type == "message_start" and events[0].message.model == "sql"
    assert client.responses.create(model="poet", input="hi", max_output_tokens=3).model == "poet"


def test_runtime_load_and_unload(tiny: Tiny, lora_server: RealServer) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = lora_server.url + "/v1"
    body = {"lora_name": "sql2", "lora_path": str(tiny.adapters["sql"])}
    loaded = httpx.post(f"{url}/load_lora_adapter", json=body, headers=headers, timeout=60)
    assert loaded.status_code == 200 and "added successfully" in loaded.text
    again = httpx.post(f"{url}/load_lora_adapter", json=body, headers=headers, timeout=60)
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    base = httpx.post(f"{url}/load_lora_adapter", json={**body, "lora_name": MODEL_NAME}, headers=headers)
    assert base.status_code == 400 and "is a served model name" in base.json()["error"]["message"]
    client = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=60)
    out = client.completions.create(model="sql2", prompt=PROMPTS[2], max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
    assert out.choices[0].model_extra["token_ids"] == tiny.peft.greedy("sql", PROMPTS[2], 8)
    for status in (200, 404):  # unloaded, then unknown
        unload = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "sql2"}, headers=headers)
        assert unload.status_code == status
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="sql2", prompt="hi", max_tokens=1)


def test_load_inplace_replaces_an_adapters_weights(tiny: Tiny, lora_server: RealServer) -> None:
    """vLLM's load_inplace: loading a served name again is a 400 without it; with it the name serves the new
    directory's weights, and a prompt whose blocks the old weights filled is not served from the prefix cache."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = lora_server.url + "/v1"
    client = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=60)
    prompt = [
        (7 * i) % 390 + 5 for i in range(40)
    ]  # two full KV blocks of 16 tokens, reused by the second call

    def greedy_tokens() -> list[int]:
        out = client.completions.create(model="swap", prompt=prompt, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
        return list(out.choices[0].model_extra["token_ids"])

    def load(path: Path, **extra: Any) -> httpx.Response:
        body = {"lora_name": "swap", "lora_path": str(path), **extra}
        return httpx.post(f"{url}/load_lora_adapter", json=body, headers=headers, timeout=60)

    assert load(tiny.adapters["sql"]).status_code == 200
    assert greedy_tokens() == tiny.peft.greedy("sql", prompt, 8)
    again = load(tiny.adapters["poet"])
    assert again.status_code == 400 and "load_inplace" in again.json()["error"]["message"]
    assert greedy_tokens() == tiny.peft.greedy("sql", prompt, 8)  # unchanged
    replaced = load(tiny.adapters["poet"], load_inplace=True)
    assert replaced.status_code == 200, replaced.text
    assert greedy_tokens() == tiny.peft.greedy("poet", prompt, 8)
    card = client.models.retrieve("swap")
    assert getattr(card, "root", None) == str(tiny.adapters["poet"])
    broken = load(
        tiny.adapters["poet"] / "missing", load_inplace=True
    )  # a failed reload keeps the old weights
    assert broken.status_code == 400 and "is not a directory" in broken.json()["error"]["message"]
    assert greedy_tokens() == tiny.peft.greedy("poet", prompt, 8)
    assert (
        httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "swap"}, headers=headers).status_code
        == 200
    )
