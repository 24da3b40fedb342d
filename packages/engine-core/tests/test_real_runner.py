"""EngineCore with the real ModelRunner on a tiny random Llama (CPU, fp32, torch attention).

In-process: greedy outputs under chunked prefill, prefix caching and forced preemption must equal HF
transformers' greedy continuation of the same weights. Engine process: dummy weights from a config-only
directory; the outputs through ZMQ must equal the in-process engine's.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")
runner_mod = pytest.importorskip(
    "treadle_model_runner.runner", reason="treadle_model_runner.runner not available"
)

from treadle_engine_core.client import InprocClient  # noqa: E402
from treadle_engine_core.config import EngineConfig, SchedulerConfig  # noqa: E402
from treadle_engine_core.messages import EngineCoreRequest  # noqa: E402
from treadle_engine_core.mp_client import AsyncMPClient  # noqa: E402
from treadle_model_runner import CacheConfig, ModelConfig, SamplingParams  # noqa: E402

pytestmark = pytest.mark.timeout(300)
VOCAB = 96


def _llama_config() -> Any:
    return tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip


def _engine_config(
    path: Path, num_blocks: int, load_format: str = "auto", async_scheduling: bool = False
) -> EngineConfig:
    return EngineConfig(
        model_config=ModelConfig(
            model=str(path),
            dtype="float32",
            attention_backend="torch",
            load_format=load_format,
            max_model_len=64,
        ),
        cache_config=CacheConfig(block_size=4, num_gpu_blocks_override=num_blocks),
        scheduler_config=SchedulerConfig(
            max_num_seqs=4, max_num_batched_tokens=16, async_scheduling=async_scheduling
        ),
    )


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(2, VOCAB, (12,), generator=gen).tolist()
    return [shared + torch.randint(2, VOCAB, (1 + 3 * i,), generator=gen).tolist() for i in range(6)]


def _run_inproc(
    client: InprocClient,
    prompts: list[list[int]],
    max_tokens: int,
    params: list[Any] | None = None,
    logprobs: dict[str, list[Any]] | None = None,
) -> dict[str, list[int]]:
    """Greedy max_tokens per prompt, or `params[i]` for prompt i; the tokens each request produced (and, into
    `logprobs`, each request's sampled-token logprobs)."""
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        client.add_request(EngineCoreRequest(f"r{i}", p, params[i] if params else greedy, time.time()))
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while client.has_unfinished_requests:
        for o in client.get_output().outputs:
            got[o.request_id].extend(o.new_token_ids)
            if logprobs is not None and o.new_logprobs:
                logprobs.setdefault(o.request_id, []).extend(o.new_logprobs)
    return got


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_greedy_matches_hf_with_prefix_cache_and_preemption(tmp_path: Path, async_scheduling: bool) -> None:
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(_llama_config()).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # sharper logits: no near-ties for argmax
    hf.save_pretrained(tmp_path, safe_serialization=True)
    prompts = _prompts()
    # 6 requests of up to 36 tokens need ~54 blocks of 4; 20 blocks force preemptions and recomputation.
    # async scheduling: the runner returns before each step's tokens reach the host (async output)
    client = InprocClient(_engine_config(tmp_path, num_blocks=20, async_scheduling=async_scheduling))
    got = _run_inproc(client, prompts, max_tokens=12)
    stats = client.get_stats()
    assert stats.num_preemptions > 0, "the test should force preemption"
    assert stats.prefix_cache_hits > 0, "requests share a 12-token prefix"
    for i, prompt in enumerate(prompts):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
        assert got[f"r{i}"] == ids[len(prompt) :], f"r{i} differs from HF greedy"


def test_engine_process_with_real_runner_matches_inproc(tmp_path: Path) -> None:
    from treadle_model_runner.loader import make_dummy_model_dir

    path = make_dummy_model_dir(_llama_config(), tmp_path / "dummy")
    prompts = _prompts()
    reference = _run_inproc(InprocClient(_engine_config(path, 64, "dummy")), prompts, max_tokens=6)
    client = AsyncMPClient(_engine_config(path, 64, "dummy"))

    async def run() -> dict[str, list[int]]:
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        for i, p in enumerate(prompts):
            await client.add_request_async(EngineCoreRequest(f"r{i}", p, params, time.time()))
        got: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
        while client.num_in_flight:
            for o in (await asyncio.wait_for(client.get_output_async(), 60)).outputs:
                got[o.request_id].extend(o.new_token_ids)
        return got

    try:
        assert client.ready.vocab_size == VOCAB and client.ready.eos_token_ids == [1]
        assert asyncio.run(run()) == reference
    finally:
        client.shutdown()
    assert client.proc.exitcode == 0


def _same_logprobs(got: dict[str, list[Any]], expected: dict[str, list[Any]]) -> None:
    """The same tokens and ranks; values equal up to float32 rounding (steps batch other rows in other runs, and
    the matmuls' summation order follows the row count)."""
    assert got.keys() == expected.keys()
    for req, lps in expected.items():
        assert [(x.token_ids, x.chosen_rank) for x in got[req]] == [(x.token_ids, x.chosen_rank) for x in lps]
        for a, b in zip(got[req], lps, strict=True):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_async_output_equals_sync_for_every_kind_of_request(tmp_path: Path, monkeypatch: Any) -> None:
    """Seeded sampling, penalties, bad words and logprobs (steps that need host tokens) mixed with plain
    sampled and greedy requests: async scheduling with deferred tokens gives exactly the sync tokens."""
    from treadle_model_runner.loader import make_dummy_model_dir

    model_dir = make_dummy_model_dir(_llama_config(), tmp_path / "dummy")
    prompts = _prompts() + _prompts()[:2]
    kinds = [  # the first four run alone at first (max_num_seqs 4): their steps are deferred
        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.9, seed=7, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=3, max_tokens=10, ignore_eos=True, top_k=20, top_p=0.9),
        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, min_tokens=4),
        SamplingParams(temperature=0.9, seed=8, max_tokens=10, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, bad_words_token_ids=[[5], [7, 9]]),
        SamplingParams(temperature=0.9, seed=9, max_tokens=10, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.9, seed=10, max_tokens=10, ignore_eos=True, frequency_penalty=0.5),
    ]

    def run(
        async_scheduling: bool, logprobs: dict[str, list[Any]] | None = None, which: list[Any] = kinds
    ) -> dict[str, list[int]]:
        client = InprocClient(_engine_config(model_dir, 20, "dummy", async_scheduling))
        return _run_inproc(client, prompts[: len(which)], 10, which, logprobs)

    from treadle_model_runner.runner.pending import TokenCopier

    deferred = []
    start = TokenCopier.start
    monkeypatch.setattr(TokenCopier, "start", lambda self, *a: deferred.append(1) or start(self, *a))
    interval = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)  # CPython's default
        sync_lps: dict[str, list[Any]] = {}
        sync = run(False, sync_lps)
        assert all(len(v) == 10 for v in sync.values()) and not deferred
        assert sys.getswitchinterval() == 0.005, "no worker thread: the GIL switch interval stays"
        async_lps: dict[str, list[Any]] = {}
        assert run(True, async_lps) == sync
        assert len(deferred) > 5, "async scheduling should defer the steps that need no host tokens"
        _same_logprobs(async_lps, sync_lps)
        assert len(sync_lps["r6"]) == 10  # the logprobs request's
        # a logprobs request's steps are deferred too: its logprobs travel with its tokens
        deferred.clear()
        alone: dict[str, list[Any]] = {}
        assert run(True, alone, [kinds[6]]) == {"r0": sync["r6"]}
        _same_logprobs({"r6": alone["r0"]}, sync_lps)
        assert len(deferred) >= 9
        # the worker thread must not wait 5 ms for the GIL after each torch call (executor.py)
        assert sys.getswitchinterval() <= 0.0005
    finally:
        sys.setswitchinterval(interval)
