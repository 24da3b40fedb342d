"""The serving step of benchmarks/gpu_e2e.py: cold start of `treadle serve`, then `treadle bench serve` per level.

The server is spawned once, in its own process group; cold start is spawn -> GET /health 200 (model init and
CUDA-graph capture included). Each concurrency level then runs the benchmark client in this process (it is
only an HTTP client), its report in logs/serve_c<N>.log. Invariants: the server is stopped on every exit path;
a level that does not fit the budget is recorded as skipped, never dropped; prompt token ids stay below the
model's vocabulary (at most 32,000, as the offline benchmarks).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpu_e2e_session import ROOT, Session, parse_log, stop_process_group, strict_json, treadle_argv


def step_serve(s: Session, items: list[str]) -> dict[str, str]:
    """Cold start (spawn -> /health 200, recorded as cold_start.json), then one bench serve per concurrency."""
    p = s.plan
    port = _free_port()
    cmd = _server_cmd(p, port)
    levels: list[dict[str, Any]] = []
    status = {}
    with _started(cmd, port, s.out / "logs" / "serve_server.log", min(400.0, s.remaining())) as (cold, facts):
        s.record("cold_start", cmd, {"cold_start_s": cold}, **facts)
        status["cold_start"] = "ok"
        for conc in p.concurrencies if "serve" in items else ():
            try:
                if s.remaining() < 20:
                    raise TimeoutError
                levels.append(_serve_level(s, port, conc))
            except TimeoutError:  # not started, or cut at the budget
                levels.append({"max_concurrency": conc, "skipped": "budget"})
        if "serve" in items:
            workload = f"random {p.serve_in} / {p.serve_out}, ignore_eos"
            s.record("serve", cmd, {"cold_start_s": cold, "levels": levels}, workload=workload, **facts)
    if s.remaining() > 90:
        status["warm_start"] = _warm_start(s)
    failed = [
        f"c={lv['max_concurrency']}: {lv['failed']} failed {lv['errors'][:1]}"
        for lv in levels
        if lv.get("failed")
    ]
    cut = [str(lv["max_concurrency"]) for lv in levels if "skipped" in lv]
    if "serve" in items:
        status["serve"] = f"FAILED: {'; '.join(failed)}" if failed else "ok"
        if cut and not failed:
            status["serve"] = f"partial: concurrency {','.join(cut)} cut at the budget"
    return status


def _warm_start(s: Session) -> str:
    """The same server started again: the Triton and FlashInfer caches now hold every kernel (vLLM's 'compile
    cache warm' start), so this is start-up without compilation. Recorded as warm_start.json."""
    port = _free_port()
    cmd = _server_cmd(s.plan, port)
    try:
        with _started(
            cmd, port, s.out / "logs" / "serve_server_warm.log", min(200.0, s.remaining())
        ) as started:
            s.record("warm_start", cmd, {"warm_start_s": started[0]}, **started[1])
        return "ok"
    except RuntimeError as exc:
        return f"FAILED: {exc}"


def _server_cmd(p: Any, port: int) -> list[str]:
    cmd = treadle_argv("serve", str(p.llama), "--load-format", "dummy", *p.engine)
    return cmd + f"--host 127.0.0.1 --port {port} --served-model-name llama-3.1-8b-dummy".split()


@contextlib.contextmanager
def _started(
    cmd: list[str], port: int, log_path: Path, limit_s: float
) -> Iterator[tuple[float, dict[str, Any]]]:
    """Spawn the server in its own process group, logging to `log_path`; yields (seconds from spawn to
    /health 200, facts parsed from its log) and stops it on every exit path."""
    with open(log_path, "w") as log:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            ready = _wait_ready(proc, port, start, limit_s)
            yield ready, parse_log(log_path.read_text(errors="replace"))
        finally:
            stop_process_group(proc)


def _serve_level(s: Session, port: int, conc: int) -> dict[str, Any]:
    """`treadle bench serve` in this process (it is only an HTTP client), its report to logs/serve_c<N>.log."""
    from treadle.bench import serve as bench_serve

    p = s.plan
    argv = (
        f"--port {port} --num-prompts {p.serve_prompts(conc)} --random-input-len {p.serve_in} "
        f"--random-output-len {p.serve_out} --max-concurrency {conc} --ignore-eos --seed {conc} "
        f"--random-vocab-size {_vocab(p.llama)}"
    )
    parser = argparse.ArgumentParser()
    bench_serve.add_serve_args(parser)
    bench = bench_serve.run_serve_benchmark(parser.parse_args(argv.split()))
    with open(s.out / "logs" / f"serve_c{conc}.log", "w") as f, contextlib.redirect_stdout(f):
        print(f"treadle bench serve {argv}")
        metrics = asyncio.run(asyncio.wait_for(bench, max(5.0, s.remaining())))
    # the per-request lists (vLLM's input_lens, output_lens, ttfts, itls: ~1 MB at c=256) go to the logs
    per_request = {k: metrics.pop(k) for k in PER_REQUEST if k in metrics}
    (s.out / "logs" / f"serve_c{conc}.requests.json").write_text(strict_json(per_request))
    return {"command": f"treadle bench serve {argv}", **metrics}


PER_REQUEST = ("input_lens", "output_lens", "ttfts", "itls")


def _vocab(model: Path) -> int:
    """Prompt token ids are drawn below this: the vocabulary, at most 32,000 (as the offline benchmarks)."""
    return min(32_000, int(json.loads((model / "config.json").read_text())["vocab_size"]))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(proc: subprocess.Popen[Any], port: int, start: float, limit_s: float) -> float:
    """Seconds from spawn to GET /health == 200."""
    import httpx

    while time.monotonic() - start < limit_s:
        if proc.poll() is not None:
            raise RuntimeError(
                f"treadle serve exited with {proc.returncode} before READY (logs/serve_server.log)"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                return time.monotonic() - start
        time.sleep(0.1)
    raise RuntimeError(f"treadle serve not READY after {limit_s:.0f} s (logs/serve_server.log)")
