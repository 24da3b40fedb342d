"""Attention backends against each other on a real-sized model: top-1 agreement and CUDA-graph decode vs eager.

    python3 benchmarks/backend_agreement.py --out result.json            # GPU, Llama-3.1-8B dummy bf16

Each configuration runs in its own process (a clean GPU each) on the same dummy weights (same seed) and the
same random token-id prompts, and saves what it saw:
  torch         reference attention, eager
  triton_eager  the unified Triton kernel, eager
  triton_graph  the unified Triton kernel, decode replayed from CUDA graphs (the default)
  flashinfer    FlashInfer, eager (when the wheel is installed); flashinfer_graph: decode from CUDA graphs
  torch_rtz     the torch reference rounding its fp32 attention output toward zero instead of to nearest
In fp32 the torch and Triton runs are compared again (top1_vs_torch_fp32): a random network amplifies bf16
rounding (one ulp in one attention output) into different top-1 picks among near-ties, so the fp32 pair isolates
the kernel. torch vs torch_rtz is the bf16 noise floor of this model: two equally exact bf16 roundings of one
attention result, at most one ulp apart per element; no bf16 kernel can be expected to agree with torch better.
Top-1 agreement: at every prompt position (teacher forcing, so one disagreement cannot derail the rest) the
most likely next token under each backend, from prompt_logprobs=TOP_K; the top-1 - top-2 margin of the reference
says how close each disagreement was to a tie. The logits are bf16 (as the lm_head computes them), so two tokens
often share the maximum exactly: the greedy pick is then the lower id, and any other kernel's rounding may pick
the other. Agreement is reported strictly (the same greedy pick) and counting ties (the two backends' sets of
tokens at their maximum share a token, i.e. each pick is a valid argmax of the other's logits up to ties). CUDA-graph decode vs eager: greedy continuations of the same
prompts, lengths staggered so the decode batch shrinks 8 -> 1 and is padded up to the captured sizes on the way.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TOP_K = 5  # prompt logprobs per position: enough to see every token tied at the maximum
CONFIG = ROOT / "benchmarks" / "configs" / "llama-3.1-8b"
RUNS: dict[str, dict[str, Any]] = {
    "torch": {"attention_backend": "torch", "enforce_eager": True},
    "triton_eager": {"attention_backend": "triton", "enforce_eager": True},
    "triton_graph": {"attention_backend": "triton"},
    # fp32: the same comparison without bf16 rounding (a random network amplifies 1-ulp differences)
    "torch_fp32": {"attention_backend": "torch", "enforce_eager": True, "dtype": "float32"},
    "triton_fp32": {"attention_backend": "triton", "enforce_eager": True, "dtype": "float32"},
    "flashinfer": {"attention_backend": "flashinfer", "enforce_eager": True},
    "flashinfer_graph": {"attention_backend": "flashinfer"},
    # the bf16 noise floor: the torch reference with its fp32 attention result rounded toward zero instead of
    # to nearest -- an equally valid bf16 answer, each element at most one ulp from torch's (see _round_toward_zero)
    "torch_rtz": {"attention_backend": "torch", "enforce_eager": True},
}


def _round_toward_zero() -> None:
    """Make the torch backend round its fp32 attention output toward zero (not to nearest) into bf16."""
    import torch

    from treadle_kernels.attention import torch_backend

    def truncate(x: torch.Tensor) -> torch.Tensor:
        return (x.float().view(torch.int32) & -65536).view(torch.float32)  # low 16 bits off: exact in bf16

    for name in ("_attend", "_attend_folded"):
        original = getattr(torch_backend.TorchAttentionImpl, name)

        def patched(self: Any, *a: Any, _original: Any = original, **k: Any) -> Any:
            return truncate(_original(self, *a, **k))

        setattr(torch_backend.TorchAttentionImpl, name, patched)


def prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(num)]


def worker(name: str, args: argparse.Namespace, out: Path) -> None:
    from treadle_frontend import LLM
    from treadle_model_runner import SamplingParams

    if name == "torch_rtz":
        _round_toward_zero()
    options = {"dtype": args.dtype, **RUNS[name]}
    llm = LLM(
        model=str(args.model), load_format="dummy", max_model_len=1024, num_gpu_blocks_override=512, seed=0,
        **options,
    )  # fmt: skip
    ps = prompts(args.num_prompts, args.prompt_len, llm.vocab_size, seed=1)
    scored = llm.generate(
        [{"prompt_token_ids": p} for p in ps],
        SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=TOP_K, ignore_eos=True),
        use_tqdm=False,
    )
    top = []  # per position: [greedy pick, top-1 - top-2 logprob margin, every token tied at the maximum]
    for r in scored:
        for pos in r.prompt_logprobs or []:
            if pos is None:
                continue
            ranked = sorted(
                (-lp.logprob, tok) for tok, lp in pos.items() if lp.rank is not None and lp.rank <= TOP_K
            )
            best = -ranked[0][0]
            tied = sorted(tok for neg, tok in ranked if -neg == best)
            margin = best + ranked[len(tied)][0] if len(ranked) > len(tied) else None
            top.append([tied[0], 0.0 if len(tied) > 1 else margin, tied])
    params = [
        SamplingParams(temperature=0.0, max_tokens=args.gen_len - 6 * i, logprobs=1, ignore_eos=True)
        for i in range(len(ps))
    ]
    gen = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
    out.write_text(
        json.dumps(
            {
                "top": top,
                "tokens": [g.outputs[0].token_ids for g in gen],
                "logprobs": [
                    [
                        lp[t].logprob
                        for lp, t in zip(g.outputs[0].logprobs or [], g.outputs[0].token_ids, strict=False)
                    ]
                    for g in gen
                ],
            }
        )
    )


def agreement(ref: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Top-1 agreement, strict (the same greedy pick) and over ties (the two sets of maximal tokens meet), and how
    close each strict disagreement was to a tie in the reference (its top-1 - top-2 logprob margin)."""
    pairs = list(zip(ref["top"], other["top"], strict=True))
    differ = [(a, b) for a, b in pairs if a[0] != b[0]]
    margins = sorted(a[1] for a, _ in differ if a[1] is not None)
    unresolved = [(a, b) for a, b in differ if not set(a[2]) & set(b[2])]
    return {
        "positions": len(pairs),
        "top1_agreement": 1.0 - len(differ) / len(pairs),
        "disagreements": len(differ),
        "disagreements_at_exact_reference_ties": sum(1 for m in margins if m == 0.0),
        "top1_agreement_counting_ties": 1.0 - len(unresolved) / len(pairs),
        "disagreements_outside_ties": len(unresolved),
        "reference_margin_at_disagreements_outside_ties": sorted(
            a[1] for a, _ in unresolved if a[1] is not None
        ),
        "positions_with_exact_reference_ties": sum(1 for a, _ in pairs if len(a[2]) > 1),
        "reference_margin_at_disagreements": margins[:20],
        "positions_with_reference_margin_below_0.05": sum(1 for a, _ in pairs if (a[1] or 0) < 0.05),
    }


def decode_match(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    same = sum(x == y for x, y in zip(a["tokens"], b["tokens"], strict=True))
    diffs = [
        abs(p - q)
        for xs, ys in zip(a["logprobs"], b["logprobs"], strict=True)
        for p, q in zip(xs, ys, strict=False)
    ]
    first = [next((i for i, (x, y) in enumerate(zip(s, t, strict=False)) if x != y), None) for s, t in
             zip(a["tokens"], b["tokens"], strict=True)]  # fmt: skip
    return {
        "sequences_identical": same,
        "sequences": len(a["tokens"]),
        "first_divergence": first,
        "max_abs_logprob_diff": max(diffs) if diffs else 0.0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=str(CONFIG))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=160)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--parallel", type=int, default=3, help="worker processes sharing the GPU at once")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args.worker, args, out)
        return 0
    seen: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    names = args.runs.split(",")
    t0 = time.monotonic()
    for start in range(0, len(names), args.parallel):  # up to --parallel processes share the GPU at once
        procs = {}
        for name in names[start : start + args.parallel]:
            part = out.with_name(f"{out.stem}.{name}.json")
            cmd = [sys.executable, __file__, "--worker", name, "--out", str(part), "--model", args.model,
                   "--dtype", args.dtype, "--num-prompts", str(args.num_prompts), "--prompt-len",
                   str(args.prompt_len), "--gen-len", str(args.gen_len)]  # fmt: skip
            log = open(out.with_name(f"{out.stem}.{name}.log"), "w")  # noqa: SIM115 (closed below)
            procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), part, log)
        for name, (proc, part, log) in procs.items():
            code = proc.wait()
            log.close()
            print(f"[{time.monotonic() - t0:5.1f} s] {name}: exit {code}", flush=True)
            if code != 0 or not part.is_file():
                errors[name] = Path(log.name).read_text()[-1500:]
                print(errors[name], flush=True)
                continue
            seen[name] = json.loads(part.read_text())
    result: dict[str, Any] = {"commit": args.commit, "command": " ".join(sys.argv), "errors": errors}
    import torch

    result["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result["model"] = args.model
    if "torch" in seen:
        result["top1_vs_torch"] = {n: agreement(seen["torch"], v) for n, v in seen.items() if n != "torch"}
        result["greedy_vs_torch"] = {
            n: decode_match(seen["torch"], v) for n, v in seen.items() if n != "torch"
        }
    if "torch_fp32" in seen:
        result["top1_vs_torch_fp32"] = {
            n: agreement(seen["torch_fp32"], v) for n, v in seen.items() if n != "torch_fp32"
        }
    for eager, graph in (("triton_eager", "triton_graph"), ("flashinfer", "flashinfer_graph")):
        if eager in seen and graph in seen:
            result[f"cuda_graph_vs_eager_{eager.split('_')[0]}"] = decode_match(seen[eager], seen[graph])
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "errors"}, indent=2))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
