"""Host cost of sampled-token logprobs, without a model: microseconds per decode step spent turning a step's
logprobs into what the engine core and the frontend keep, with and without 5 top logprobs, in one process.

Default (host path, seconds on CPU): the real code between the device and the user, fed with a fake device.
Per step, for 64 and 256 running requests:
- runner: `AsyncModelRunnerOutput.get_output` over host tensors ([N] tokens; [N, 6] ids and logprobs, [N] ranks,
  as the deferred GPU step copies them): `LogprobsTensors.tolists` and the per-request lists;
- sched: the engine core's `Scheduler.schedule` and `update_from_output` (stop checks, EngineCoreOutputs);
- front: the frontend's `OutputProcessor.process_outputs` with the embedded SmolLM2 tokenizer (offline
  FINAL_ONLY by default, `--output-kind delta` as a streaming server);
- dicts, chat: what users then read, amortized per step: `outputs[0].logprobs` of every request's last output
  (of every chunk with `--output-kind delta`) as vLLM's list of {id: Logprob} with decoded tokens; OpenAI's chat
  `logprobs.content` built from it (as the server does).
Token ids are drawn Zipf-like from the 49,152-token vocabulary (text repeats tokens), with a fixed seed.

`--e2e`: the older end-to-end run (a tiny dummy Llama, 256 x 64 greedy tokens through `LLM.generate`, with
`--gc-stats`), whose numbers benchmarks/README.md records.

Usage: python benchmarks/logprobs_host.py [--batch 64 256] [--steps 64] [--rounds 2] [--profile F] [--out F]
       python benchmarks/logprobs_host.py --e2e [--rounds 2] [--gc-stats] [--out F]
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from treadle_engine_core.config import EngineConfig, FakeRunnerConfig
from treadle_engine_core.core import EngineCore
from treadle_engine_core.executor import FakeExecutor
from treadle_engine_core.heap import freeze_startup_heap
from treadle_frontend.engine_client import make_engine_request
from treadle_frontend.input_processor import InputProcessor, ModelInfo
from treadle_frontend.logprobs import chat_logprobs
from treadle_frontend.output_processor import OutputProcessor
from treadle_frontend.tokenizer import load_tokenizer
from treadle_model_runner import CacheConfig, ModelConfig, SamplingParams
from treadle_model_runner.loader import default_model_path
from treadle_model_runner.outputs import AsyncModelRunnerOutput
from treadle_model_runner.runner.sampling import _host_logprobs
from treadle_model_runner.sampling_params import RequestOutputKind

NUM_TOP = 5
STAGES = ("runner", "sched", "front", "dicts", "chat")


class HostDevice:
    """What the device hands the host each step: sampled tokens and, when asked, [N, K + 1] logprob rows (column 0
    the sampled token), drawn Zipf-like from the vocabulary with a fixed seed."""

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.vocab_size = vocab_size

    def _ids(self, shape: tuple[int, ...]) -> np.ndarray:
        return (self.rng.zipf(1.2, size=shape) + 2) % self.vocab_size

    def step(self, req_ids: list[str], logprobs: bool) -> AsyncModelRunnerOutput:
        n = len(req_ids)
        tokens = torch.from_numpy(self._ids((n,)))
        extra = None
        if logprobs:
            top = torch.from_numpy(self._ids((n, NUM_TOP)))
            ids = torch.cat([tokens[:, None], top], dim=1)  # [N, K + 1]
            values = -torch.from_numpy(np.sort(self.rng.exponential(2.0, (n, NUM_TOP + 1)), axis=1)).float()
            ranks = torch.from_numpy(self.rng.integers(1, 8, n))  # [N]
            extra = functools.partial(_host_logprobs, [ids, values, ranks], [NUM_TOP] * n)
        return AsyncModelRunnerOutput(req_ids, list(range(n)), tokens, lambda: None, extra)


def run_host(
    inputs: InputProcessor, batch: int, steps: int, logprobs: bool, kind: RequestOutputKind, seed: int
) -> dict[str, float]:
    """One run of `batch` requests over `steps` decode steps (after their one prefill step); µs per decode step.
    `inputs` (and its token texts) lives as long as the process, as a server's does."""
    tokenizer, max_len = inputs.tokenizer, inputs.model.max_model_len
    cfg = EngineConfig(
        model_config=ModelConfig(model="fake", max_model_len=max_len),
        cache_config=CacheConfig(block_size=16, num_gpu_blocks_override=batch * (max_len // 16 + 2)),
        executor="fake",
        fake_runner=FakeRunnerConfig(vocab_size=len(tokenizer), check_kv=False),
        log_stats=True,
    )
    engine = EngineCore(cfg, executor=FakeExecutor(cfg))
    # as LLM and the engine process do after their start-up (the KV block pool included); the run's requests and
    # everything they keep alive stay in the collector's scans
    freeze_startup_heap("logprobs_host")
    vocab = len(tokenizer)
    frontend = OutputProcessor()
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True, output_kind=kind)
    if logprobs:
        params = params.clone(logprobs=NUM_TOP)
    for i in range(batch):
        prompt = [10 + i % 97, 11 + i % 89, 12 + i % 83, 13, 14, 15, 16, 17]
        parent, states, reqs = inputs.make_requests(str(i), None, prompt, params.clone())
        frontend.add_request(parent, states)
        for rid, child in reqs:
            engine.add_request(make_engine_request(rid, prompt, child, time.time()))
    device = HostDevice(vocab, seed)
    spent = dict.fromkeys(STAGES, 0.0)
    num_positions = 0
    for step in range(steps + 1):
        t0 = time.perf_counter()
        so = engine.scheduler.schedule()
        t1 = time.perf_counter()
        mro = device.step(list(so.num_scheduled_tokens), logprobs)
        t2 = time.perf_counter()
        output = mro.get_output()
        t3 = time.perf_counter()
        outs = engine.scheduler.update_from_output(so, output)
        t4 = time.perf_counter()
        processed = frontend.process_outputs(outs.outputs)
        t5 = time.perf_counter()
        # what a reader gets, as it comes: every chunk (delta), the last output (cumulative, final_only)
        read = [
            out.outputs[0]
            for out in processed.request_outputs
            if (kind == RequestOutputKind.DELTA or out.finished) and out.outputs[0].logprobs is not None
        ]
        t6 = time.perf_counter()
        num_positions += sum(len(list(completion.logprobs)) for completion in read)
        t7 = time.perf_counter()
        for completion in read:
            chat_logprobs(inputs.token_texts, completion.token_ids, completion.logprobs, NUM_TOP)
        t8 = time.perf_counter()
        spent["dicts"] += t7 - t6
        spent["chat"] += t8 - t7
        if step:  # decode steps only
            spent["runner"] += t3 - t2
            spent["sched"] += (t1 - t0) + (t4 - t3)
            spent["front"] += t5 - t4
    assert not frontend.has_unfinished(), "every request ends in the last step"
    assert num_positions == (batch * (steps + 1) if logprobs else 0), num_positions
    return {stage: round(seconds * 1e6 / steps, 1) for stage, seconds in spent.items()}


def host_main(args: argparse.Namespace) -> dict[str, Any]:
    tokenizer = load_tokenizer(default_model_path())
    info = ModelInfo(name="bench", path=None, max_model_len=64 + args.steps, vocab_size=len(tokenizer))
    inputs = InputProcessor(tokenizer, info)
    kind = RequestOutputKind[args.output_kind.upper()]
    profiler = cProfile.Profile() if args.profile else None
    runs: dict[str, list[dict[str, float]]] = {}
    for round_ in range(args.rounds):
        for batch in args.batch:
            for logprobs in (False, True):
                if profiler is not None and logprobs:
                    profiler.enable()
                us = run_host(inputs, batch, args.steps, logprobs, kind, seed=round_)
                if profiler is not None:
                    profiler.disable()
                us["total"] = round(sum(us.values()), 1)
                name = f"{batch} {'logprobs=5' if logprobs else 'plain'}"
                runs.setdefault(name, []).append(us)
                print(f"round {round_} {name:>14}: " + "  ".join(f"{k} {v:8.1f}" for k, v in us.items()))
    print("µs per decode step (min over rounds), logprobs=5 minus plain:")
    for batch in args.batch:
        plain, lp = (min(r["total"] for r in runs[f"{batch} {v}"]) for v in ("plain", "logprobs=5"))
        print(f"  batch {batch}: plain {plain:.0f}, logprobs {lp:.0f}, extra {lp - plain:.0f}")
    if profiler is not None:
        profiler.dump_stats(args.profile)
    return {
        "workload": f"host path, {args.steps} decode steps, {NUM_TOP} top logprobs, {args.output_kind}",
        "us_per_step": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256], help="running requests (host path)")
    ap.add_argument("--steps", type=int, default=64, help="decode steps per run (host path)")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of plain / logprobs runs")
    ap.add_argument("--output-kind", choices=("final_only", "delta", "cumulative"), default="final_only")
    ap.add_argument(
        "--profile", default=None, help="host path: write cProfile stats of the logprobs runs here"
    )
    ap.add_argument(
        "--e2e", action="store_true", help="the end-to-end tiny-model run instead (benchmarks/README)"
    )
    ap.add_argument("--gc-stats", action="store_true", help="--e2e: count garbage collections")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.e2e:
        from logprobs_host_e2e import e2e_main

        result = e2e_main(args.rounds, args.gc_stats)
    else:
        result = host_main(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
