"""LoRA under tensor parallelism on CPU (gloo), end to end, on the LoRA e2e tests' tiny Llama (two key/value heads:
one on each rank) and its two PEFT adapters, "sql" on every projection and "poet" on k, v and down.

The offline LLM with tensor_parallel_size=2 gives PEFT's greedy continuations for a list mixing the base model and
both adapters, in process and with its engine in a process of its own. With one slot and one adapter in host memory
every rank loads adapters again at admission and turns its slot over; a bad adapter fails its request on rank 0 and
reaches no other rank, and the engine serves on. `treadle serve -tp 2 --enable-lora` runs the adapter a request's
`model` names, and one loaded at run time (load_lora_adapter reaches every rank), then unloads it.

E2E_LORA_TP_PORT pins the server's port (default: a free one).
"""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from e2e_helpers import API_KEY, MODEL_NAME, start_server
from lora_e2e_assets import ADAPTER_OF, ENGINE, GREEDY, PROMPTS, Tiny, build_tiny

from treadle import LLM, LoRARequest

PORT = int(os.environ.get("E2E_LORA_TP_PORT", "0")) or None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return build_tiny(tmp_path_factory.mktemp("lora_tp"))


@pytest.fixture(scope="module")
def want(tiny: Tiny) -> list[list[int]]:
    return [tiny.peft.greedy(a, p, 8) for p, a in zip(PROMPTS, ADAPTER_OF, strict=True)]


def _generate(llm: LLM, tiny: Tiny, adapters: list[str | None]) -> list[list[int]]:
    prompts: list[Any] = [{"prompt_token_ids": p} for p in PROMPTS]
    outs = llm.generate(prompts, GREEDY, lora_request=[tiny.request(a) for a in adapters])
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("engine_process", [False, True], ids=["inproc", "engine_process"])
def test_two_ranks_run_base_and_adapters_as_peft(
    tiny: Tiny, want: list[list[int]], engine_process: bool
) -> None:
    llm = LLM(str(tiny.model), tensor_parallel_size=2, engine_process=engine_process, enable_lora=True,
              max_loras=1, max_cpu_loras=1, max_lora_rank=8, **ENGINE)  # fmt: skip
    try:
        got = _generate(llm, tiny, ADAPTER_OF)
        with pytest.raises(ValueError, match="is not a directory"):
            llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY,
                         lora_request=LoRARequest("missing", 9, str(tiny.model / "no-such-adapter")))  # fmt: skip
        again = _generate(llm, tiny, ADAPTER_OF[::-1])  # the other order: other evictions and slot turns
    finally:
        llm.shutdown()
    assert got == want
    assert again == [tiny.peft.greedy(a, p, 8) for p, a in zip(PROMPTS, ADAPTER_OF[::-1], strict=True)]
    assert got[0] != got[1] != got[2]  # the adapters change the continuations


def test_server_with_two_ranks_runs_served_and_runtime_adapters(tiny: Tiny, tmp_path: Path) -> None:
    extra = ["--load-format", "auto", "--dtype", "float32", "--tensor-parallel-size", "2", "--enable-lora",
             "--max-loras", "2", "--max-lora-rank", "8", "--lora-modules", f"sql={tiny.adapters['sql']}"]  # fmt: skip
    os.environ["TREADLE_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    try:
        server = start_server(tiny.model, tmp_path / "server.log", extra, port=PORT)
    finally:
        del os.environ["TREADLE_ALLOW_RUNTIME_LORA_UPDATING"]
    try:
        url, headers = server.url + "/v1", {"Authorization": f"Bearer {API_KEY}"}
        client = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=60)

        def greedy(model: str) -> list[int]:
            out = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=8, temperature=0,
                                            extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
            return list(out.choices[0].model_extra["token_ids"])

        body = {"lora_name": "late", "lora_path": str(tiny.adapters["poet"])}
        loaded = httpx.post(f"{url}/load_lora_adapter", json=body, headers=headers, timeout=60)
        assert loaded.status_code == 200, loaded.text
        for model, adapter in ((MODEL_NAME, None), ("sql", "sql"), ("late", "poet")):
            assert greedy(model) == tiny.peft.greedy(adapter, PROMPTS[1], 8), model
        unload = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "late"}, headers=headers)
        assert unload.status_code == 200, unload.text
        with pytest.raises(openai.NotFoundError):
            greedy("late")
        assert greedy("sql") == tiny.peft.greedy("sql", PROMPTS[1], 8)
    finally:
        server.stop()


def test_shutdown_frees_the_in_process_engine(tiny: Tiny) -> None:
    """After `shutdown` and a collection, rank 0's runner and KV cache are gone, though LLM froze the start-up heap
    and rank 0's adapter cache refers back to its executor (a cycle): on a GPU a second engine in this process sizes
    its KV cache from what the first left (test_e2e_lora_parallel_gpu.py)."""
    llm = LLM(str(tiny.model), tensor_parallel_size=2, enable_lora=True, max_loras=1, max_cpu_loras=1,
              max_lora_rank=8, **ENGINE)  # fmt: skip
    try:
        assert _generate(llm, tiny, ADAPTER_OF)[0]
        executor = llm.client.engine.executor  # type: ignore[attr-defined]
        watched = [weakref.ref(executor)] + [weakref.ref(cache) for cache in executor.runner.kv_caches]
        del executor
    finally:
        llm.shutdown()
    del llm
    gc.collect()
    assert [ref() is None for ref in watched] == [True] * len(watched)
