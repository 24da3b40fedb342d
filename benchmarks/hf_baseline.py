"""Baseline: HF transformers `generate` on the same model and workload as a treadle benchmark.

Random token-id prompts of fixed length (no padding needed), `min_new_tokens = max_new_tokens = output_len`
(the equivalent of ignore_eos), processed in batches of `--batch-size`. Prints and records output tokens/s.
`--model` is an HF-format directory; with `--dummy` only its config.json is read and the weights are random.

Usage: python benchmarks/hf_baseline.py --model DIR [--dummy] --num-prompts 64 --input-len 128 --output-len 128
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM


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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32}.get(args.dtype) or getattr(
        torch, args.dtype
    )
    torch.manual_seed(args.seed)
    if args.dummy:
        config = AutoConfig.from_pretrained(args.model, local_files_only=True)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype, local_files_only=True).to(
            device
        )
    model.eval()
    vocab = model.config.vocab_size
    rng = random.Random(args.seed)
    prompts = [
        [rng.randrange(10, min(vocab, 32000)) for _ in range(args.input_len)] for _ in range(args.num_prompts)
    ]
    gen_kwargs = dict(
        max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False, pad_token_id=0
    )
    if args.static_cache:
        gen_kwargs["cache_implementation"] = "static"
    # Warm up on the first full batch with the timed settings, so one-time work (the static cache's automatic
    # torch.compile on CUDA, allocator growth) stays out of the timed run.
    with torch.inference_mode():
        model.generate(torch.tensor(prompts[: args.batch_size], device=device), **gen_kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    num_out = 0
    with torch.inference_mode():
        for i in range(0, len(prompts), args.batch_size):
            batch = torch.tensor(prompts[i : i + args.batch_size], device=device)
            out = model.generate(batch, **gen_kwargs)
            num_out += (out.shape[1] - batch.shape[1]) * batch.shape[0]
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result = {
        "engine": "hf-transformers",
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "dtype": str(dtype),
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "batch_size": args.batch_size,
        "elapsed_s": elapsed,
        "total_output_tokens": num_out,
        "output_tokens_per_second": num_out / elapsed,
    }
    print(
        f"HF transformers: {result['output_tokens_per_second']:.2f} output tokens/s ({num_out} tokens, {elapsed:.1f} s)"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
