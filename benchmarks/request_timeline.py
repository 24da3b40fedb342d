"""Host-side timeline of batch-1 requests: where the time of each engine step goes (in-process engine).

Wraps, without changing them, the engine's scheduler (schedule, update_from_output), the executor's submission of
a step to its worker thread, the runner's execute (in that thread) and the wait for a step's sampled tokens, and
runs one 128-token prompt (reused, as `treadle bench latency` does) at several output lengths. Prints, per request,
the wall time and each step's pieces in milliseconds; writes them to --out. ``--cprofile F`` also runs cProfile
over every step that computes more than one token (the eager prefills; in the runner's worker thread) and writes
the functions with the most own time and the most cumulative time to F.

    python3 benchmarks/request_timeline.py --out OUT.json [--model DIR] [--lengths 1,2,8] [--cprofile F]
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import pstats
import time
from pathlib import Path

from treadle_engine_core import core, executor, scheduler
from treadle_frontend import LLM
from treadle_model_runner import SamplingParams, outputs
from treadle_model_runner.runner import model_runner

ROOT = Path(__file__).resolve().parent.parent
EVENTS: list[tuple[str, float, float]] = []  # (what, start s, duration ms)


def _wrap(cls: type, name: str, before, after) -> None:
    """Replace ``cls.name`` by a wrapper that calls ``before(*args)``, then the method, then ``after`` with what
    ``before`` returned."""
    original = getattr(cls, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        token = before(*args)
        try:
            return original(*args, **kwargs)
        finally:
            after(token)

    setattr(cls, name, wrapper)


def _timed(cls: type, name: str, label: str) -> None:
    def after(start: float) -> None:
        EVENTS.append((label, start, (time.perf_counter() - start) * 1e3))

    _wrap(cls, name, lambda *_: time.perf_counter(), after)


def _profile_prefills(profiler: cProfile.Profile) -> None:
    """Run ModelRunner.execute under ``profiler`` when the step computes more than one token."""

    def before(_runner, scheduler_output) -> bool:
        multi = scheduler_output.total_num_scheduled_tokens > 1
        if multi:
            profiler.enable()
        return multi

    def after(multi: bool) -> None:
        if multi:
            profiler.disable()

    _wrap(model_runner.ModelRunner, "execute", before, after)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=str(ROOT / "benchmarks" / "configs" / "llama-3.1-8b"))
    ap.add_argument("--lengths", default="1,2,3,8,1,2,3,8")
    ap.add_argument("--no-async-scheduling", action="store_true")
    ap.add_argument("--cprofile", help="write a cProfile summary of the multi-token (prefill) steps here")
    args = ap.parse_args()
    profiler = cProfile.Profile() if args.cprofile else None
    if profiler is not None:
        _profile_prefills(profiler)  # wrapped by the timing below: profiled steps time slower
    _timed(scheduler.Scheduler, "schedule", "schedule")
    _timed(scheduler.Scheduler, "update_from_output", "update")
    _timed(executor.Executor, "execute_async", "submit")
    _timed(model_runner.ModelRunner, "execute", "execute (worker)")
    _timed(outputs.AsyncModelRunnerOutput, "get_output", "wait tokens")
    _timed(core.EngineCore, "step", "engine step")
    options = {"load_format": "dummy", "max_model_len": 4096, "gpu_memory_utilization": 0.9}
    if args.no_async_scheduling:
        options["async_scheduling"] = False
    llm = LLM(model=args.model, **options)
    prompt = [{"prompt_token_ids": list(range(1000, 1128))}]
    llm.generate(prompt, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    runs = []
    for n in (int(x) for x in args.lengths.split(",")):
        EVENTS.clear()
        t0 = time.perf_counter()
        llm.generate(prompt, SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        wall = (time.perf_counter() - t0) * 1e3
        events = [{"what": w, "at_ms": round((s - t0) * 1e3, 2), "ms": round(d, 2)} for w, s, d in EVENTS]
        runs.append({"max_tokens": n, "wall_ms": round(wall, 2), "events": events})
        print(f"max_tokens {n}: {wall:.2f} ms", flush=True)
        for e in events:
            print(f"    {e['at_ms']:8.2f}  {e['what']:18} {e['ms']:8.2f}", flush=True)
    if profiler is not None:
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(40)
        Path(args.cprofile).write_text(text.getvalue())
    Path(args.out).write_text(
        json.dumps({"async_scheduling": not args.no_async_scheduling, "runs": runs}, indent=1)
    )


if __name__ == "__main__":
    main()
