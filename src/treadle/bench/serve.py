"""`treadle bench serve`: a load generator for any OpenAI-compatible server, printing what `vllm bench serve` prints.

Each request streams `/v1/completions` with `stream_options.include_usage`, so the server's own token count is
used. Prompts are random token ids (the "random" dataset), so no tokenizer is needed on the client. Requests
arrive as a Poisson process at `--request-rate` (inf = all at once), capped at `--max-concurrency` in flight.

Metrics, as vLLM defines them: TTFT = send → first token; TPOT = (E2E − TTFT) / (output tokens − 1) per request;
ITL = gaps between streamed chunks, pooled over requests; E2EL = send → last byte.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from treadle.bench.offline import at_least, range_ratio


@dataclass(slots=True)
class RequestResult:
    success: bool = False
    prompt_len: int = 0  # tokens sent
    output_tokens: int = 0  # tokens generated, from the server's usage chunk
    ttft: float = 0.0  # seconds
    latency: float = 0.0  # seconds, send -> end of stream
    itl: list[float] = field(default_factory=list)  # seconds between consecutive chunks
    error: str = ""


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default=None, help="server URL (default http://HOST:PORT)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--endpoint", default="/v1/completions")
    parser.add_argument("--model", default=None, help="model name (default: the server's first model)")
    parser.add_argument(
        "--dataset-name", default="random", choices=["random"], help="vLLM's flag: random only"
    )
    parser.add_argument("--num-prompts", type=at_least(1), default=1000)
    parser.add_argument("--random-input-len", type=at_least(1), default=1024)
    parser.add_argument("--random-output-len", type=at_least(1), default=128)
    parser.add_argument("--random-range-ratio", type=range_ratio, default=0.0)
    parser.add_argument(
        "--random-vocab-size", type=int, default=1000, help="prompt token ids are drawn below this"
    )
    parser.add_argument("--request-rate", type=float, default=float("inf"))
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--save-result", action="store_true")
    parser.add_argument(
        "--result-dir", default=None, help="directory of the --save-result file (default: here)"
    )
    parser.add_argument("--result-filename", default=None)


def sample_lengths(num: int, mean: int, ratio: float, rng: random.Random) -> list[int]:
    """Lengths uniform in [mean * (1 - ratio), mean * (1 + ratio)], as vLLM's random dataset draws them."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {ratio}")
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(num)]


async def _one_request(
    client: httpx.AsyncClient, url: str, payload: dict, headers: dict[str, str]
) -> RequestResult:
    result = RequestResult(prompt_len=len(payload["prompt"]))
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                body = await resp.aread()
                result.error = f"HTTP {resp.status_code}: {body[:200]!r}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    result.output_tokens = int(chunk["usage"]["completion_tokens"])
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
        result.latency = time.perf_counter() - start
        result.success = result.ttft > 0.0
        if not result.success:
            result.error = "no tokens streamed"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def run_serve_benchmark(args: argparse.Namespace) -> dict:
    base = args.base_url or f"http://{args.host}:{args.port}"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rng = random.Random(args.seed)
    in_lens = sample_lengths(args.num_prompts, args.random_input_len, args.random_range_ratio, rng)
    out_lens = sample_lengths(args.num_prompts, args.random_output_len, args.random_range_ratio, rng)
    prompts = [[rng.randrange(10, args.random_vocab_size) for _ in range(n)] for n in in_lens]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(None), limits=limits) as client:
        model = args.model
        if model is None:
            try:
                resp = await client.get("/v1/models", headers=headers)
            except httpx.HTTPError as e:
                raise ValueError(f"cannot reach the server at {base} ({type(e).__name__}: {e})") from None
            if resp.status_code != 200:
                raise ValueError(f"GET {base}/v1/models answered {resp.status_code}: {resp.text[:300]}")
            model = resp.json()["data"][0]["id"]
        # one short request first, as vLLM's bench does: a wrong URL, key, model or endpoint fails here, said once
        probe = {
            "model": model,
            "prompt": prompts[0][:16],
            "max_tokens": 2,
            "temperature": 0.0,
            "stream": True,
        }
        first = await _one_request(client, args.endpoint, probe, headers)
        if not first.success:
            raise ValueError(f"initial test request to {base}{args.endpoint} failed: {first.error}")
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def limited(payload: dict) -> RequestResult:
            if sem is None:
                return await _one_request(client, args.endpoint, payload, headers)
            async with sem:
                return await _one_request(client, args.endpoint, payload, headers)

        tasks = []
        start = time.perf_counter()
        for prompt, out_len in zip(prompts, out_lens, strict=True):
            payload = {
                "model": model,
                "prompt": prompt,
                "max_tokens": out_len,
                "temperature": 0.0,
                "stream": True,
                "stream_options": {"include_usage": True},
                "ignore_eos": bool(args.ignore_eos),
            }
            tasks.append(asyncio.create_task(limited(payload)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    metrics = summarize(results, duration)
    metrics.update(
        model=model, base_url=base, max_concurrency=args.max_concurrency, request_rate=args.request_rate
    )
    metrics.update(  # vLLM's record keys, per request too
        date=time.strftime("%Y%m%d-%H%M%S"), backend="openai", model_id=model, num_prompts=args.num_prompts,
        server_version=await _server_version(base, headers), input_lens=[r.prompt_len for r in results],
        output_lens=[r.output_tokens for r in results], ttfts=[r.ttft for r in results],
        itls=[r.itl for r in results],
    )  # fmt: skip
    print_summary(metrics, args)
    if args.save_result:
        name = args.result_filename or f"treadle-serve-{int(time.time())}.json"
        if args.result_dir:  # as vLLM: the file goes into the directory, made if missing
            os.makedirs(args.result_dir, exist_ok=True)
            name = os.path.join(args.result_dir, name)
        saved_args = {k: v for k, v in vars(args).items() if k != "func"}
        if saved_args.get("api_key"):
            saved_args["api_key"] = "<redacted>"
        with open(
            name, "w"
        ) as f:  # strict JSON: an infinite request rate is written "inf", as vLLM writes it
            json.dump(_finite({**metrics, "args": saved_args}), f, indent=2, allow_nan=False)
    return metrics


async def _server_version(base: str, headers: dict[str, str]) -> str | None:
    """The server's /version (treadle's and vLLM's route), or None when it has none."""
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            resp = await client.get("/version", headers=headers)
        return str(resp.json().get("version")) if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def _finite(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.success]
    ttfts = [r.ttft for r in ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [x for r in ok for x in r.itl]
    e2els = [r.latency for r in ok]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)

    def stats(name: str, xs: list[float]) -> dict[str, float]:
        arr = np.asarray(xs or [0.0]) * 1000.0
        return {
            f"mean_{name}_ms": float(arr.mean()),
            f"median_{name}_ms": float(np.median(arr)),
            f"p99_{name}_ms": float(np.percentile(arr, 99)),
        }

    out: dict = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
    }
    for name, xs in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        out.update(stats(name, xs))
    return out


def print_summary(m: dict, args: argparse.Namespace) -> None:
    line = "{:<40} {:<10}".format
    fline = "{:<40} {:<10.2f}".format
    if args.max_concurrency:
        print(line("Maximum request concurrency:", args.max_concurrency))
    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="))
    print(line("Successful requests:", m["completed"]))
    if m["failed"]:
        print(line("Failed requests:", m["failed"]))
    print(fline("Benchmark duration (s):", m["duration"]))
    print(line("Total input tokens:", m["total_input_tokens"]))
    print(line("Total generated tokens:", m["total_output_tokens"]))
    print(fline("Request throughput (req/s):", m["request_throughput"]))
    print(fline("Output token throughput (tok/s):", m["output_throughput"]))
    print(fline("Total Token throughput (tok/s):", m["total_token_throughput"]))
    sections = (
        ("ttft", "Time to First Token", "TTFT"),
        ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
        ("itl", "Inter-token Latency", "ITL"),
        ("e2el", "End-to-end Latency", "E2EL"),
    )
    for key, title, short in sections:
        print("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        print(fline(f"Mean {short} (ms):", m[f"mean_{key}_ms"]))
        print(fline(f"Median {short} (ms):", m[f"median_{key}_ms"]))
        print(fline(f"P99 {short} (ms):", m[f"p99_{key}_ms"]))
    print("=" * 50)
    for error in m["errors"]:
        print(f"error: {error}")


def main_serve(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one INFO line per request
    metrics = asyncio.run(run_serve_benchmark(args))
    return 0 if metrics["completed"] > 0 else 1


__all__ = ["RequestResult", "add_serve_args", "main_serve", "run_serve_benchmark", "summarize"]
