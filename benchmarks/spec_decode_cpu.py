"""N-gram speculative decoding on the CPU: the embedded default model copying a passage, with and without drafts.

The offline `LLM` on SmolLM2-135M-Instruct (fp32, CPU) gets chat prompts asking it to repeat a long passage word for
word, greedy, --max-tokens out (EOS ends a reply earlier). Two engines live in this process: one without
speculation, one with `--speculative-config` (vLLM's n-gram prompt lookup: the reply copies the prompt, so drafts
taken from it are mostly right). Each is warmed up once; then the same batch is timed --iters times on each,
alternating, and the best run of each is kept (the machine is shared: alternating exposes both to the same load,
and the 1-minute load average is recorded).

Reported: output tokens/s of both, the speed-up, the mean acceptance length (tokens a request gets per verification
step, 1 + accepted / drafts, as vLLM's SpecDecoding log line), the draft acceptance rate, and whether the two
configurations wrote the same tokens (they must: greedy).

Usage: python benchmarks/spec_decode_cpu.py [--batch-size 1] [--max-tokens 128] [--task copy|answer]
       [--speculative-config '{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4,
       "prompt_lookup_min": 2}']   -> benchmarks/results/spec-decode-cpu-<commit>.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SPEC = '{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'
PASSAGES = [
    "The old lighthouse stood at the edge of the cliff, its white paint peeling after a hundred winters. Every "
    "evening the keeper climbed the one hundred and twelve steps, trimmed the wick, polished the great lens and "
    "watched the beam sweep across the dark water. Ships passed in the night, their crews never knowing his name, "
    "yet each of them trusted the light to guide them home. When the storms came in November, the keeper did not "
    "sleep at all; he sat by the lamp with a pot of tea and a worn book of poems, listening to the wind.",
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light into chemical energy. "
    "In the chloroplasts, chlorophyll absorbs mostly blue and red light. The energy splits water molecules, "
    "releasing oxygen, and drives the production of ATP and NADPH. In the Calvin cycle, these carriers power the "
    "fixation of carbon dioxide into sugars, which the plant uses to grow, to store energy as starch, and to build "
    "cellulose for its cell walls. Nearly all life on Earth depends on this process, directly or indirectly.",
]

QUESTIONS = [
    "Why do leaves change colour in autumn? Answer in a few sentences.",
    "Give three tips for writing clear emails.",
    "What is the difference between weather and climate?",
    "Describe how a bicycle gear works.",
]


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def timed(llm: Any, prompts: list[Any], params: Any) -> tuple[float, list[Any]]:
    start = time.perf_counter()
    outs = llm.chat(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, outs


def summary(llm: Any, times: list[float], outs: list[Any], before: Any) -> dict[str, Any]:
    after = llm.client.get_stats()
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    num_tokens, best = sum(len(t) for t in tokens), min(times)
    drafts = after.spec_num_drafts - before.spec_num_drafts
    drafted = after.spec_num_draft_tokens - before.spec_num_draft_tokens
    accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    return {
        "output_tokens": num_tokens,
        "elapsed_s": [round(t, 3) for t in times],
        "output_tokens_per_second": round(num_tokens / best, 2),
        "mean_acceptance_length": round(1 + accepted / drafts, 3) if drafts else None,
        "draft_acceptance_rate": round(accepted / drafted, 3) if drafted else None,
        "drafts": drafts,
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
        "finish_reasons": [o.outputs[0].finish_reason for o in outs],
        "_tokens": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per batch (passages alternate)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--speculative-config", default=SPEC)
    parser.add_argument("--device-name", default="cpu 2-core (shared)")
    parser.add_argument(
        "--task", choices=["copy", "answer"], default="copy",
        help="copy: repeat a passage (drafts mostly right); answer: open questions (drafts rare)",
    )  # fmt: skip
    parser.add_argument(
        "--out", default=None, help="default: benchmarks/results/spec-decode-cpu-<commit>.json"
    )
    args = parser.parse_args()

    import torch

    from treadle_frontend import LLM
    from treadle_model_runner import SamplingParams
    from treadle_model_runner.loader import default_model_path

    model_dir = default_model_path()  # converts the embedded default once
    prompts = [
        [
            {
                "role": "user",
                "content": f"Repeat the following text exactly, word for word:\n\n{PASSAGES[i % 2]}"
                if args.task == "copy"
                else QUESTIONS[i % len(QUESTIONS)],
            }
        ]
        for i in range(args.batch_size)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    llms = {
        "baseline": LLM(str(model_dir), max_model_len=1024),
        "speculative": LLM(str(model_dir), max_model_len=1024, speculative_config=args.speculative_config),
    }
    times: dict[str, list[float]] = {name: [] for name in llms}
    outs: dict[str, list[Any]] = {}
    before: dict[str, Any] = {}
    load_before = load_average()
    try:
        for name, llm in llms.items():
            timed(llm, prompts, params)  # warm-up
            before[name] = llm.client.get_stats()
        for _ in range(args.iters):
            for name, llm in llms.items():
                elapsed, outs[name] = timed(llm, prompts, params)
                times[name].append(elapsed)
        results = {name: summary(llm, times[name], outs[name], before[name]) for name, llm in llms.items()}
    finally:
        for llm in llms.values():
            llm.shutdown()
    load_after = load_average()
    for name, result in results.items():
        print(f"{name}: {json.dumps({k: v for k, v in result.items() if not k.startswith('_')})}")
    same = results["baseline"].pop("_tokens") == results["speculative"].pop("_tokens")
    base, spec = results["baseline"], results["speculative"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    sha = commit.stdout.strip() or "unknown"
    record = {
        "benchmark": "spec_decode_cpu",
        "device": args.device_name,
        "cpu": platform.processor() or platform.machine(),
        "num_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": sha,
        "command": shlex.join(["python", "benchmarks/spec_decode_cpu.py", *sys.argv[1:]]),
        "args": vars(args),
        "model": f"SmolLM2-135M-Instruct (embedded default, {model_dir})",
        "dtype": "float32",
        "workload": f"{args.batch_size} chat prompt(s) "
        + ("asking to repeat a ~110-word passage" if args.task == "copy" else "with open questions")
        + ", greedy, max_tokens "
        f"{args.max_tokens}, warm-up then best of {args.iters} (alternating)",
        "speculative_config": json.loads(args.speculative_config),
        "baseline": base,
        "speculative": spec,
        "speedup": round(spec["output_tokens_per_second"] / base["output_tokens_per_second"], 3),
        "same_tokens": same,
        "load_average_1m_before": load_before,
        "load_average_1m_after": load_after,
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"spec-decode-cpu-{sha}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"baseline {base['output_tokens_per_second']} tok/s, speculative {spec['output_tokens_per_second']} tok/s "
        f"({record['speedup']}x), mean acceptance length {spec['mean_acceptance_length']}, same tokens: {same} -> {out}"
    )


if __name__ == "__main__":
    main()
