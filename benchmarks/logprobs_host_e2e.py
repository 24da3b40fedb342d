"""The end-to-end half of logprobs_host.py (`--e2e`): a tiny dummy Llama (hidden 64, 2 layers, a 2,048-token
vocabulary) with the embedded SmolLM2 tokenizer, 256 requests x 64 greedy tokens, without and with 5 top logprobs,
alternating in one process (offline LLM, in-process). What it times is the engine's and the frontend's Python per
token: scheduling, sampling bookkeeping, logprobs lists, Logprob objects, and the garbage collector's passes over
what the run keeps alive (`--gc-stats` counts them; treadle_engine_core.heap).
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import transformers as tf

from treadle import LLM, SamplingParams
from treadle_model_runner.loader import default_model_path, make_dummy_model_dir


def tiny_model() -> str:
    cfg = tf.LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=2, bos_token_id=1)  # fmt: skip
    out = make_dummy_model_dir(cfg, Path(tempfile.mkdtemp(prefix="logprobs-host-")) / "model")
    tokenizer = Path(default_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, out / name)
    return str(out)


class GcTimer:
    """Collections per generation and their seconds, from gc.callbacks."""

    def __init__(self) -> None:
        self.stats = {g: [0, 0.0] for g in range(3)}
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            entry = self.stats[info["generation"]]
            entry[0] += 1
            entry[1] += time.perf_counter() - self._start

    def take(self) -> dict[str, Any]:
        out = {f"gen{g}": {"collections": n, "seconds": round(s, 4)} for g, (n, s) in self.stats.items()}
        self.stats = {g: [0, 0.0] for g in range(3)}
        return out


def e2e_main(rounds: int, gc_stats: bool) -> dict[str, Any]:
    llm = LLM(tiny_model(), load_format="dummy", max_model_len=512)
    prompts: list[Any] = [{"prompt_token_ids": [5 + i % 100, 7, 9 + i % 50]} for i in range(256)]
    plain = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    variants = {"plain": plain, "logprobs": plain.clone(logprobs=5)}
    llm.generate(prompts[:8], variants["logprobs"])  # warm-up
    timer = GcTimer() if gc_stats else None
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, params in variants.items():
            start = time.perf_counter()
            llm.generate(prompts, params)
            elapsed = time.perf_counter() - start
            run: dict[str, Any] = {"output_tok_s": round(256 * 64 / elapsed, 1)}
            if timer is not None:
                run["gc"] = timer.take()
                run["tracked_objects"] = len(gc.get_objects())
            runs[name].append(run)
            print(name, run)
    return {"workload": "tiny dummy Llama, 256 x 64 greedy tokens, plain / 5 top logprobs", "runs": runs,
            "frozen_objects": gc.get_freeze_count()}  # fmt: skip
