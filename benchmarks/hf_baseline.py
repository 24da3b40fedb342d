"""Baseline: HF transformers on the same model and workload as a treadle benchmark.

Random token-id prompts of fixed length (no padding needed), every one generating exactly `output_len` tokens
(the equivalent of ignore_eos). Two ways to run them, both named by the GPU issue:
  `generate` (default; `--static-cache` for a static cache) in batches of `--batch-size`, after one untimed batch;
  `--continuous-batching`: `generate_batch`, transformers' own continuous batching over a paged cache (paged SDPA
  attention unless flash-attn is installed), every prompt submitted at once, EOS disabled. Its timed span runs
  from the first request leaving the queue to the last one finishing (transformers' per-request `lifespan`), so
  the CUDA-graph warm-up it does first is left out; the wall time with the warm-up is recorded beside it.
Prints and records output tokens/s. `--model` is an HF-format directory; with `--dummy` only its config.json is
read and the weights are random.

Usage: python benchmarks/hf_baseline.py --model DIR [--dummy] --num-prompts 64 --input-len 128 --output-len 128
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--dummy", action="store_true", help="random weights from config.json")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--static-cache", action="store_true")
    parser.add_argument("--continuous-batching", action="store_true", help="generate_batch (paged cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.continuous_batching and args.static_cache:
        parser.error("--static-cache applies to generate, not to --continuous-batching")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32}.get(args.dtype) or getattr(
        torch, args.dtype
    )
    torch.manual_seed(args.seed)
    if args.dummy:
        config = AutoConfig.from_pretrained(args.model, local_files_only=True)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, local_files_only=True).to(
            device
        )
    model.eval()
    vocab = model.config.vocab_size
    rng = random.Random(args.seed)
    prompts = [
        [rng.randrange(10, min(vocab, 32000)) for _ in range(args.input_len)] for _ in range(args.num_prompts)
    ]
    if args.continuous_batching:
        result = continuous_batching(model, prompts, args.output_len, device)
    else:
        result = batched_generate(model, prompts, args.output_len, args.batch_size, args.static_cache, device)
    result = {
        "engine": "hf-transformers",
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "dtype": str(dtype),
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        **result,
        "output_tokens_per_second": result["total_output_tokens"] / result["elapsed_s"],
    }
    print(
        f"HF transformers ({result['mode']}): {result['output_tokens_per_second']:.2f} output tokens/s "
        f"({result['total_output_tokens']} tokens, {result['elapsed_s']:.1f} s)"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


def batched_generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    output_len: int,
    batch_size: int,
    static: bool,
    device: str,
) -> dict:
    """`generate` over the prompts in batches, after one untimed batch with the same settings."""
    gen_kwargs = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0)
    if static:
        gen_kwargs["cache_implementation"] = "static"
    # Warm up on the first full batch with the timed settings, so one-time work (the static cache's automatic
    # torch.compile on CUDA, allocator growth) stays out of the timed run.
    with torch.inference_mode():
        model.generate(torch.tensor(prompts[:batch_size], device=device), **gen_kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    num_out = 0
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            batch = torch.tensor(prompts[i : i + batch_size], device=device)
            out = model.generate(batch, **gen_kwargs)
            num_out += (out.shape[1] - batch.shape[1]) * batch.shape[0]
    if device == "cuda":
        torch.cuda.synchronize()
    mode = "generate, static cache" if static else "generate"
    return {"mode": mode, "batch_size": batch_size, "elapsed_s": time.perf_counter() - start,
            "total_output_tokens": num_out}  # fmt: skip


def continuous_batching(
    model: torch.nn.Module, prompts: list[list[int]], output_len: int, device: str
) -> dict:
    """`generate_batch` on every prompt at once, EOS disabled (-1), greedy; the span excludes its warm-up."""
    config = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=-1, pad_token_id=0)
    start = time.perf_counter()
    # not under inference_mode: generate_batch's worker thread runs outside it and updates tensors made here in place
    outputs = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=True)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    failed = [o.error for o in outputs.values() if o.error is not None]
    if failed or len(outputs) != len(prompts):
        raise SystemExit(f"generate_batch: {len(outputs)} of {len(prompts)} outputs, errors {failed[:3]}")
    lengths = [len(o.generated_tokens) for o in outputs.values()]
    if min(lengths) != output_len:
        raise SystemExit(f"generate_batch stopped early: output lengths {min(lengths)}..{max(lengths)}")
    span = max(o.lifespan[1] for o in outputs.values()) - min(o.lifespan[0] for o in outputs.values())
    return {
        "mode": f"generate_batch (paged cache; the model loaded with {model.config._attn_implementation})",
        "elapsed_s": span,
        "wall_with_warmup_s": wall,
        "total_output_tokens": sum(lengths),
    }


if __name__ == "__main__":
    main()
