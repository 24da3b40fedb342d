"""benchmarks/hf_baseline.py, the HF side of the GPU issue's baseline, on CPU with a tiny random Llama: both ways
it runs HF (batched `generate`, `generate_batch`) produce exactly the workload's tokens, even where the model
would stop at its EOS token (ignore_eos), and the command line rejects a mix of the two."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from e2e_helpers import LLAMA
from transformers import AutoModelForCausalLM, LlamaConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import hf_baseline  # noqa: E402


@pytest.fixture(scope="module")
def model_and_prompts() -> tuple[torch.nn.Module, list[list[int]]]:
    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "architectures"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(10, config.vocab_size, (4, 12), generator=gen).tolist()
    # make the first token greedy decoding picks for prompt 0 the model's EOS: an engine honouring EOS stops there
    with torch.inference_mode():
        first = int(model(torch.tensor(prompts[:1])).logits[0, -1].argmax())
    model.config.eos_token_id = model.generation_config.eos_token_id = first
    return model, prompts


@pytest.mark.slow
def test_continuous_batching_ignores_eos(model_and_prompts: tuple[torch.nn.Module, list[list[int]]]) -> None:
    model, prompts = model_and_prompts
    r = hf_baseline.continuous_batching(model, prompts, 6, "cpu")
    assert r["total_output_tokens"] == 4 * 6
    assert 0 < r["elapsed_s"] <= r["wall_with_warmup_s"] and r["mode"].startswith("generate_batch")


def test_generate_ignores_eos(model_and_prompts: tuple[torch.nn.Module, list[list[int]]]) -> None:
    model, prompts = model_and_prompts
    r = hf_baseline.batched_generate(model, prompts, 6, 2, False, "cpu")
    assert r["total_output_tokens"] == 4 * 6 and r["batch_size"] == 2 and r["elapsed_s"] > 0


def test_static_cache_with_continuous_batching_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    cmd = [sys.executable, str(ROOT / "benchmarks/hf_baseline.py"), "--model", str(tmp_path), "--dummy",
           "--static-cache", "--continuous-batching"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--static-cache applies to generate" in proc.stderr
