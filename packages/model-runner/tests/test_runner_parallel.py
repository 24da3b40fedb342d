"""Tensor parallelism on CPU (gloo): two ranks, each a ModelRunner holding half of every model's heads and columns,
driven by the same fake scheduler, give the one-rank runner's tokens and logprobs.

Models: Llama (GQA, untied lm_head with a vocabulary that does not divide by two; and with one key/value head,
which both ranks then hold), Qwen2 (q/k/v bias), Qwen3 (q/k norms, tied embeddings), Gemma 3 (sliding-window layers,
GELU, tied with an odd vocabulary), Qwen3-MoE and Mixtral (each rank holds a slice of every expert), Phi-3 (qkv_proj and
gate_up_proj stacked in the checkpoint, each rank cutting its rows of every shard; partial rotary), OLMo 2 (q/k norms over
every head: the ranks sum their squares; one key/value head, so both ranks hold it and its norm), Qwen2-MoE (the shared
expert split like a dense MLP, beside the routed ones), Granite (multipliers),
and dummy weights (each rank draws the
one-rank values and keeps its slice). Prompts are chunked, so steps mix prefills and decodes; a request verifies
draft tokens (speculative decoding) on every rank alike.
"""

from __future__ import annotations

import multiprocessing
import socket
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from spec_decode_driver import reference, speculate
from test_runner_fakes import FakeScheduler, make_runner, perturb_

from treadle_model_runner import SamplingParams
from treadle_model_runner.loader import make_dummy_model_dir
from treadle_model_runner.parallel import destroy_tensor_parallel, init_tensor_parallel

SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 256}  # fmt: skip


def model_configs() -> dict[str, Any]:
    """The tiny configs of the module docstring's models (also test_runner_parallel4.py's)."""
    return {
        "llama": tf.LlamaConfig(vocab_size=129, tie_word_embeddings=False, **SMALL),
        "qwen2": tf.Qwen2Config(vocab_size=128, tie_word_embeddings=False, **SMALL),
        "mqa": tf.LlamaConfig(
            vocab_size=128, **(SMALL | {"num_key_value_heads": 1})
        ),  # its KV head on both ranks
        "qwen3": tf.Qwen3Config(vocab_size=128, tie_word_embeddings=True, head_dim=16, **SMALL),
        "gemma3": tf.Gemma3TextConfig(
            vocab_size=131,
            head_dim=16,
            sliding_window=8,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"],
            **SMALL,
        ),
        "qwen3_moe": tf.Qwen3MoeConfig(
            vocab_size=128,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            head_dim=16,
            **SMALL,
        ),
        "mixtral": tf.MixtralConfig(vocab_size=128, num_local_experts=4, num_experts_per_tok=2, **SMALL),
        "phi3": tf.Phi3Config(vocab_size=128, partial_rotary_factor=0.5, pad_token_id=0, **SMALL),
        # q/k norms over all heads, each rank holding half the query heads and both the one key/value head
        "olmo2": tf.Olmo2Config(vocab_size=128, pad_token_id=0, **(SMALL | {"num_key_value_heads": 1})),
        "qwen2_moe": tf.Qwen2MoeConfig(
            vocab_size=128,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            **SMALL,
        ),
        "granite": tf.GraniteConfig(
            vocab_size=128,
            embedding_multiplier=3.0,
            residual_multiplier=0.4,
            attention_multiplier=0.11,
            logits_scaling=2.5,
            **SMALL,
        ),
    }


def save_checkpoints(root: Path, configs: dict[str, Any], seed: int = 0) -> dict[str, tuple[Path, str]]:
    """Each config as a random HF checkpoint (the i-th seeded with seed + i, weights perturbed) under root/name."""
    dirs: dict[str, tuple[Path, str]] = {}
    for i, (name, config) in enumerate(configs.items()):
        torch.manual_seed(seed + i)
        hf = tf.AutoModelForCausalLM.from_config(config).eval()
        perturb_(hf, seed=seed + i, std=0.15)
        hf.save_pretrained(root / name, safe_serialization=True)
        dirs[name] = (root / name, "auto")
    return dirs


def _checkpoints(root: Path) -> dict[str, tuple[Path, str]]:
    dirs = save_checkpoints(root, model_configs())
    dirs["dummy"] = (make_dummy_model_dir(tf.LlamaConfig(vocab_size=128, **SMALL), root / "dummy"), "dummy")
    return dirs


def _run(model_dir: Path, load_format: str, tp: int) -> dict[str, Any]:
    """Tokens and logprobs of a fixed mix of requests (greedy, seeded sampling, logprobs, prompt logprobs)."""
    runner = make_runner(model_dir, load_format=load_format, tensor_parallel_size=tp)
    sched = FakeScheduler(runner, seed=5)
    gen = torch.Generator().manual_seed(3)
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.8, top_p=0.9, seed=11),
        SamplingParams(temperature=0.0, prompt_logprobs=2),
        SamplingParams(temperature=1.0, top_k=20, seed=12, logprobs=2),
    ]
    for i, p in enumerate(params):
        sched.add(f"r{i}", torch.randint(1, 128, (5 + 9 * i,), generator=gen).tolist(), p, max_tokens=12)
    tokens = sched.run(budget=24)
    # speculative decoding: every rank verifies the same drafts and keeps the same tokens (spec_decode_driver)
    spec_params = SamplingParams(temperature=0.8, top_k=30, seed=4, logprobs=2)
    ref = reference(sched, "ref-spec", torch.randint(1, 128, (7,), generator=gen).tolist(), spec_params, 16)
    tokens["spec"] = speculate(sched, "spec", ref, spec_params, runner.vocab_size, tol=1e-4).tokens
    logprobs = []
    for out in sched.outputs:
        sampled = [(r, lps) for r, lps in zip(out.req_ids, out.logprobs, strict=False) if lps]
        for req_id, per_token in sampled + sorted(out.prompt_logprobs.items()):
            logprobs += [(req_id, lp.token_ids, lp.logprobs) for lp in per_token]
    return {"tokens": tokens, "logprobs": logprobs}


def _rank_main(rank: int, init_method: str, dirs: dict[str, tuple[Path, str]], results: Any) -> None:
    try:
        torch.set_num_threads(1)
        init_tensor_parallel(rank, 2, init_method, torch.device("cpu"))
        got = {name: _run(path, fmt, tp=2) for name, (path, fmt) in dirs.items()}
        destroy_tensor_parallel()
        if rank == 0:
            results.put(got)
    except BaseException:
        results.put(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def two_rank_results(rank_main: Any, *args: Any, timeout_s: float = 600, ranks: int = 2) -> dict[int, Any]:
    """`rank_main(rank, init_method, *args, results)` in `ranks` (two) spawned processes (a gloo group); what each
    rank put on `results` as (rank, value), after checking that none sent a traceback and all exited cleanly."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    init = f"tcp://127.0.0.1:{_free_port()}"
    procs = [ctx.Process(target=rank_main, args=(r, init, *args, results)) for r in range(ranks)]
    for p in procs:
        p.start()
    by_rank = dict(results.get(timeout=timeout_s) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert not any(isinstance(v, str) for v in by_rank.values()), by_rank
    assert [p.exitcode for p in procs] == [0] * ranks
    return by_rank


def check_same_outputs(got: dict[str, Any], expected: dict[str, Any]) -> None:
    """Per model (`_run`'s results): the same tokens, and every logprob entry's request and token ids equal with
    logprobs within 1e-4."""
    for name in expected:
        assert got[name]["tokens"] == expected[name]["tokens"], name
        pairs = list(zip(got[name]["logprobs"], expected[name]["logprobs"], strict=True))
        assert pairs, name
        for (req_a, ids_a, lp_a), (req_b, ids_b, lp_b) in pairs:
            assert (req_a, ids_a) == (req_b, ids_b), name
            assert max(abs(a - b) for a, b in zip(lp_a, lp_b, strict=True)) < 1e-4, name


def test_two_ranks_match_one(tmp_path: Path) -> None:
    dirs = _checkpoints(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    init = f"tcp://127.0.0.1:{_free_port()}"
    procs = [ctx.Process(target=_rank_main, args=(r, init, dirs, results)) for r in range(2)]
    for p in procs:
        p.start()
    expected = {name: _run(path, fmt, tp=1) for name, (path, fmt) in dirs.items()}
    got = results.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    assert not isinstance(got, str), got
    assert [p.exitcode for p in procs] == [0, 0]
    check_same_outputs(got, expected)


def test_group_size_must_divide_heads() -> None:
    from treadle_model_runner.parallel import TensorParallel

    with pytest.raises(
        ValueError, match=r"num_key_value_heads \(2\) is not divisible by tensor_parallel_size \(4\)"
    ):
        TensorParallel(0, 4).shard(2, "num_key_value_heads")


def test_one_shot_limit_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from treadle_model_runner import envs
    from treadle_model_runner.symm_all_reduce import SmallAllReduce

    assert envs.TREADLE_TP_ONE_SHOT_MAX_BYTES() == 2 << 20
    monkeypatch.setenv("TREADLE_TP_ONE_SHOT_MAX_BYTES", "0")
    assert envs.TREADLE_TP_ONE_SHOT_MAX_BYTES() == 0
    monkeypatch.setenv("TREADLE_TP_ONE_SHOT_MAX_BYTES", "1MiB")
    with pytest.raises(ValueError, match="TREADLE_TP_ONE_SHOT_MAX_BYTES='1MiB'"):
        envs.TREADLE_TP_ONE_SHOT_MAX_BYTES()
    # off CUDA (gloo) there is no kernel to set up: every all-reduce goes through the group
    assert SmallAllReduce.create(None, torch.float32, torch.device("cpu"), 1 << 20) is None


def test_one_shot_needs_peer_access_to_every_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    from treadle_model_runner import symm_all_reduce

    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda device, peer: peer != 2)
    assert symm_all_reduce._no_peer_access(torch.device("cuda", 1), 2) == ""
    assert symm_all_reduce._no_peer_access(torch.device("cuda", 0), 4) == (
        "cuda:0 cannot read cuda:2 directly (no peer access)"
    )


def test_a_group_left_behind_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # as after a teardown that gave up
    with pytest.raises(RuntimeError, match=r"already has a torch\.distributed process group"):
        init_tensor_parallel(0, 2, "tcp://127.0.0.1:1", torch.device("cpu"))
