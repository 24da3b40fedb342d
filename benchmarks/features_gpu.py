"""This session's vLLM features on a GPU, dummy weights: LoRA's cost, whole-vocabulary logprobs, beam search.

One process per engine configuration (`--run`), each printing one JSON line; run them one after another:
- `base`: the engine without LoRA: N prompts of `--input-len` random tokens, greedy, `--output-len` tokens,
  ignore_eos; then the same with 5 top logprobs and with the whole vocabulary (max_logprobs -1); then beam search
  (width 4) on 8 of the prompts, and one beam against greedy.
- `lora`: the engine with `enable_lora` (max_loras 2, max_lora_rank 16, two random rank-16 adapters on all seven
  projections, written in PEFT's format): the same N prompts on the base model, then half of them under each
  adapter; and whether the base-model rows' tokens equal the `base` run's (bf16: the LoRA engine runs the
  projections unfused, so a few may differ).
Throughput is output tokens over the wall time of one `generate` after a warm-up batch.

    python benchmarks/features_gpu.py --model benchmarks/configs/llama-3.1-8b --run base --out base.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(directory: Path, config: dict, seed: int, r: int) -> Path:
    """A random rank-r LoRA adapter on every projection of a Llama-shaped model, in PEFT's file format."""
    from safetensors.torch import save_file

    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for name, (n_in, n_out) in shapes.items():
            parent = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(r, n_in, generator=gen) * 0.01).to(
                torch.bfloat16
            )
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(n_out, r, generator=gen) * 0.01).to(
                torch.bfloat16
            )
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    meta = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": TARGETS, "bias": "none"}
    (directory / "adapter_config.json").write_text(json.dumps(meta))
    return directory


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(llm, prompts, params, **kw) -> tuple[float, list]:
    sync()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False, **kw)
    return time.perf_counter() - t0, outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--run", choices=("base", "lora"), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--adapters", default="/tmp/adapters")
    args = ap.parse_args()
    from treadle import LLM, BeamSearchParams, LoRARequest, SamplingParams

    config = json.loads((Path(args.model) / "config.json").read_text())
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(1000, 100000) for _ in range(args.input_len)]}
               for _ in range(args.num_prompts)]  # fmt: skip
    greedy = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    num_out = args.num_prompts * args.output_len
    result: dict = {"run": args.run, "model": args.model, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len}  # fmt: skip
    options = {"load_format": "dummy", "max_model_len": 4096, "seed": 0}
    if args.run == "base":
        llm = LLM(model=args.model, max_logprobs=-1, **options)
        timed(llm, prompts[:16], greedy)  # warm-up
        wall, outs = timed(llm, prompts, greedy)
        result["greedy_tok_s"] = num_out / wall
        result["greedy_tokens"] = [list(o.outputs[0].token_ids) for o in outs]
        few = prompts[:32]
        for name, k in (("logprobs_5", 5), ("logprobs_all", -1)):
            params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=k)
            wall, outs = timed(llm, few, params)
            entries = len(outs[0].outputs[0].logprobs[0])
            same = all(
                list(o.outputs[0].token_ids) == result["greedy_tokens"][i][:16] for i, o in enumerate(outs)
            )
            result[name] = {"wall_s": wall, "entries_per_position": entries, "tokens_equal_greedy": same}
        beam = BeamSearchParams(beam_width=4, max_tokens=32, ignore_eos=True)
        sync()
        t0 = time.perf_counter()
        searched = llm.beam_search(prompts[:8], beam)
        result["beam_width4_8x32_s"] = time.perf_counter() - t0
        result["beam_best_cum_logprob"] = [o.sequences[0].cum_logprob for o in searched]
        one = llm.beam_search(prompts[:4], BeamSearchParams(beam_width=1, max_tokens=32, ignore_eos=True))
        result["beam_width1_equals_greedy"] = [
            o.sequences[0].tokens[args.input_len :] == result["greedy_tokens"][i][:32]
            for i, o in enumerate(one)
        ]
        del result["greedy_tokens"][4:]
    else:
        base_run = json.loads(Path(args.out).with_name("features_base.json").read_text())
        paths = [write_adapter(Path(args.adapters) / f"a{i}", config, seed=i, r=16) for i in (1, 2)]
        llm = LLM(model=args.model, enable_lora=True, max_loras=2, max_lora_rank=16, **options)
        timed(llm, prompts[:16], greedy)
        wall, outs = timed(llm, prompts, greedy)
        result["base_rows_tok_s"] = num_out / wall
        got = [list(o.outputs[0].token_ids) for o in outs[:4]]
        result["base_rows_equal_base_engine"] = [
            g == w for g, w in zip(got, base_run["greedy_tokens"], strict=False)
        ]
        loras = [LoRARequest(f"a{i}", i, str(p)) for i, p in zip((1, 2), paths, strict=True)]
        per_prompt = [loras[i % 2] for i in range(args.num_prompts)]
        timed(llm, prompts[:16], greedy, lora_request=per_prompt[:16])
        wall, outs = timed(llm, prompts, greedy, lora_request=per_prompt)
        result["two_adapters_tok_s"] = num_out / wall
        result["adapter_changes_tokens"] = [
            list(o.outputs[0].token_ids) != g for o, g in zip(outs, got, strict=False)
        ]
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "greedy_tokens"}))
    llm.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    main()
