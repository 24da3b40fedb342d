"""The real embedded default (SmolLM2-135M-Instruct) on CPU: greedy continuations identical to HF `generate`.

Eight prompts of different lengths run together through the ModelRunner (driven by the fake scheduler, with
chunked prefill under a small token budget); each must produce exactly the 64 tokens HF transformers' greedy
`generate` produces for it alone, on the same converted checkpoint and dtype.
"""

from __future__ import annotations

import pytest
import torch
from test_runner_fakes import FakeScheduler, make_runner
from tokenizers import Tokenizer

from treadle_model_runner import SamplingParams
from treadle_model_runner.loader import default_model_path

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "The three primary colours are",
    "def fibonacci(n):",
    "Explain photosynthesis in one sentence.",
    "Once upon a time, in a small village by the mountains, there lived",
    "List three uses of a paperclip:",
    "Translate 'good morning' into Spanish.",
]
NUM_NEW = 64

pytestmark = pytest.mark.slow


def test_greedy_continuations_match_hf_generate() -> None:
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]

    runner = make_runner(path, max_num_seqs=8, max_num_batched_tokens=96, block_size=16, num_blocks=512)
    scheduler = FakeScheduler(runner, seed=1)
    for i, prompt in enumerate(prompts):
        scheduler.add(
            f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=NUM_NEW), max_tokens=NUM_NEW
        )
    ours = scheduler.run(budget=96, max_seqs=8)

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    hf.eval()
    hf.generation_config.eos_token_id = None  # run past EOS, as the fake scheduler does (no EOS masking)
    for i, prompt in enumerate(prompts):
        with torch.inference_mode():
            out = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=NUM_NEW,
                do_sample=False,
                pad_token_id=0,
            )
        expected = out[0, len(prompt) :].tolist()
        assert ours[f"r{i}"] == expected, f"prompt {i} ({PROMPTS[i]!r}) diverged from HF generate"
