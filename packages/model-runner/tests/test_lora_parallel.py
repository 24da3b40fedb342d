"""LoRA under tensor parallelism on CPU (gloo): two ranks, each a ModelRunner holding half of every projection and its
part of every adapter, run one batch mixing the base model and two PEFT adapters on all seven projections (q, k, v,
o, gate, up, down; one rank 8, one rsLoRA rank 4). On both ranks every scheduled position's logits, prefill chunks
and decode steps alike, are within 1e-4 of PEFT's with that request's adapter, and the greedy continuations equal
the one-rank runner's (and PEFT's `generate`).

Two tiny Llamas: "gqa" has two key/value heads, one on each rank, and every bias on (q/k/v, o, gate/up, down: a
row-parallel bias is rank 0's alone while both ranks add a partial delta); "mqa" has one key/value head, which both
ranks hold (each rank's k and v rows of B are then the whole of them).
"""

from __future__ import annotations

import multiprocessing
import socket
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers as tf
from lora_fixtures import PeftReference, save_adapter
from test_models import COMMON
from test_runner_fakes import FakeScheduler, make_runner, perturb_, record_hidden

from treadle_model_runner.config import LoRAConfig
from treadle_model_runner.lora import LoRARequest
from treadle_model_runner.parallel import destroy_tensor_parallel, init_tensor_parallel

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_OF = {"base": None, "a1": "a", "b1": "b", "a2": "a", "b2": "b"}  # request -> its adapter
LENGTHS = {"base": 9, "a1": 7, "b1": 11, "a2": 20, "b2": 5}  # prompt tokens
FIRST_STEP = {"base": 9, "a1": 7, "b1": 11, "a2": 12, "b2": 5}  # a2's prompt in two chunks
MAX_TOKENS = 6


@dataclass
class Case:
    hf: Any
    model: Path
    loras: dict[str, LoRARequest]  # adapter name -> request
    adapters: dict[str, Path]


@dataclass
class Run:
    # (request, its tokens up to the last scheduled one, tokens computed before the step, logits [n, vocab]);
    # numpy: a queue sends torch tensors as shared memory, gone once the rank's process has ended
    positions: list[tuple[str, list[int], int, np.ndarray]]
    prompts: dict[str, list[int]]
    tokens: dict[str, list[int]]  # request -> greedy continuation


def _cases(root: Path) -> dict[str, Case]:
    configs = {
        "gqa": tf.LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True),
        "mqa": tf.LlamaConfig(**(COMMON | {"num_key_value_heads": 1})),
    }
    cases = {}
    for seed, (name, config) in enumerate(configs.items()):
        torch.manual_seed(seed)
        hf = tf.LlamaForCausalLM(config).eval()
        perturb_(hf, seed=seed, std=0.15)
        hf.save_pretrained(root / name / "base", safe_serialization=True)
        adapters = {
            "a": save_adapter(hf, root / name / "a", seed=10 + seed, r=8, alpha=16, targets=ALL_TARGETS),
            "b": save_adapter(hf, root / name / "b", seed=20 + seed, r=4, alpha=6, targets=ALL_TARGETS,
                              use_rslora=True),
        }  # fmt: skip
        loras = {a: LoRARequest(a, i + 1, str(path)) for i, (a, path) in enumerate(adapters.items())}
        cases[name] = Case(hf, root / name / "base", loras, adapters)
    return cases


def _run(model: Path, loras: dict[str, LoRARequest], tp: int, **runner_kwargs: Any) -> Run:
    """The mixed batch, scheduled like the one-rank LoRA test (test_lora.py); every scheduled position's logits."""
    lora_config = LoRAConfig(enable_lora=True, max_loras=2, max_lora_rank=8)
    runner = make_runner(model, tensor_parallel_size=tp, lora_config=lora_config, **runner_kwargs)
    gen = torch.Generator().manual_seed(7)
    sched = FakeScheduler(runner, seed=3)
    for rid, adapter in ADAPTER_OF.items():
        prompt = torch.randint(1, COMMON["vocab_size"], (LENGTHS[rid],), generator=gen).tolist()
        lora = None if adapter is None else loras[adapter]
        sched.add(rid, prompt, max_tokens=MAX_TOKENS, lora_request=lora)
    prompts = {rid: list(r.prompt) for rid, r in sched.requests.items()}
    hidden = record_hidden(runner)
    positions = []
    plan = dict(FIRST_STEP)
    while sched.requests:
        before = {rid: (list(r.prompt + r.output), r.num_computed) for rid, r in sched.requests.items()}
        out = sched.step(plan)
        with torch.no_grad():  # under tensor parallelism a collective: every rank computes them
            logits = runner._require_model().compute_logits(hidden[-1]).float()
        start = 0
        for rid in out.req_ids:
            tokens, computed = before[rid]
            n = plan[rid]
            rows = logits[start : start + n].numpy().copy()
            positions.append((rid, tokens[: computed + n], computed, rows))
            start += n
        plan = {rid: r.num_tokens - r.num_computed for rid, r in sched.requests.items()}
    return Run(positions, prompts, dict(sched.done_outputs))


def _rank_main(rank: int, init_method: str, cases: dict[str, tuple[Path, dict[str, LoRARequest]]],
               results: Any) -> None:  # fmt: skip
    try:
        torch.set_num_threads(1)
        init_tensor_parallel(rank, 2, init_method, torch.device("cpu"))
        got = {name: _run(model, loras, tp=2) for name, (model, loras) in cases.items()}
        destroy_tensor_parallel()
        results.put((rank, got))
    except BaseException:
        results.put((rank, traceback.format_exc()))
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_one_and_two_ranks(cases: dict[str, Case]) -> tuple[dict[str, Run], dict[int, dict[str, Run]]]:
    """Every case's run on one rank (here), and on each of two ranks (processes of their own, over gloo)."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    init = f"tcp://127.0.0.1:{_free_port()}"
    args = {name: (case.model, case.loras) for name, case in cases.items()}
    procs = [ctx.Process(target=_rank_main, args=(r, init, args, results)) for r in range(2)]
    for p in procs:
        p.start()
    one_rank = {name: _run(case.model, case.loras, tp=1) for name, case in cases.items()}
    by_rank = dict(results.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for got in by_rank.values():
        assert not isinstance(got, str), got
    assert [p.exitcode for p in procs] == [0, 0]
    return one_rank, by_rank


def test_two_ranks_match_peft_and_one_rank(tmp_path: Path) -> None:
    cases = _cases(tmp_path)
    one_rank, by_rank = run_one_and_two_ranks(cases)
    for name, case in cases.items():
        peft = PeftReference(case.hf, case.adapters)
        for rank, runs in sorted(by_rank.items()):
            check_run(runs[name], one_rank[name], peft, f"{name} rank {rank}")
        check_run(one_rank[name], one_rank[name], peft, name)


def check_run(run: Run, one_rank: Run, reference: Any, label: str) -> None:
    """`run`'s logits at every scheduled position are within 1e-4 of `reference`'s (PeftReference or
    MergedReference) under the request's adapter, and its tokens are the one-rank run's, which are the reference's
    greedy continuations; the adapters change the model (base, a and b disagree on a prompt)."""
    assert run.prompts == one_rank.prompts, label
    num_checked = 0
    for rid, tokens, computed, logits in run.positions:
        ref = reference.logits(ADAPTER_OF[rid], tokens)[computed:]
        torch.testing.assert_close(torch.from_numpy(logits), ref, atol=1e-4, rtol=0,
                                   msg=lambda m, r=rid: f"{label} {r}: {m}")  # fmt: skip
        num_checked += len(ref)
    assert num_checked == sum(LENGTHS.values()) + len(LENGTHS) * (MAX_TOKENS - 1), label
    assert run.tokens == one_rank.tokens, label
    for rid, adapter in ADAPTER_OF.items():
        assert one_rank.tokens[rid] == reference.greedy(adapter, one_rank.prompts[rid], MAX_TOKENS), (
            label,
            rid,
        )
    outs = [reference.logits(adapter, one_rank.prompts["base"]) for adapter in (None, "a", "b")]
    assert all((x - y).abs().max() > 1e-2 for i, x in enumerate(outs) for y in outs[i + 1 :]), label
