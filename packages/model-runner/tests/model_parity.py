"""Test helpers (no tests here): the two checks every model's parity test runs against HF transformers.

- `check_mixed_batch`: one step mixing a fresh prefill, a chunked prefill continuing on cached blocks and several
  decodes gives, at every position, logits within 1e-4 (max abs) of HF's forward over the same tokens, and samples
  HF's argmax.
- `check_greedy`: greedy 32-token continuations of three prompts (3, 12 and 30 tokens, prefilled in 16-token
  chunks) equal HF `generate`.
`hf` is the HF model (fp32, eval, on the CPU) whose `save_pretrained` directory is `path`; `runner_kwargs` go to
`make_runner` (e.g. `max_model_len`, `device`); `atol` loosens the logits check for a GPU's fp32 (tests marked gpu).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from test_runner_fakes import FakeScheduler, make_runner, record_hidden

from treadle_model_runner.runner import ModelRunner


def hf_logits(hf: Any, tokens: list[int]) -> torch.Tensor:
    """HF's logits [len(tokens), vocab] (fp32) for one sequence."""
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def prefixed(prefix: str) -> Callable[[str], str]:
    """An assert_close msg callback naming what was compared."""
    return lambda message: f"{prefix}: {message}"


def check_mixed_batch(hf: Any, path: Path, vocab_size: int, atol: float = 1e-4, **runner_kwargs: Any) -> None:
    runner = make_runner(path, **runner_kwargs)
    gen = torch.Generator().manual_seed(7)
    prompts = {name: torch.randint(1, vocab_size, (n,), generator=gen).tolist()
               for name, n in {"chunked": 23, "b": 5, "c": 7, "d": 9, "fresh": 11}.items()}  # fmt: skip
    sched = FakeScheduler(runner, seed=3)
    for name, prompt in prompts.items():
        sched.add(name, prompt, max_tokens=4)
    sched.step({"chunked": 10, "b": 5, "c": 7, "d": 9})

    hidden = record_hidden(runner)
    before = {name: (list(r.prompt + r.output), r.num_computed) for name, r in sched.requests.items()}
    plan = {"chunked": 13, "fresh": 11, "b": 1, "c": 1, "d": 1}
    out = sched.step(plan)
    with torch.no_grad():
        logits = runner._require_model().compute_logits(hidden[0]).float().cpu()

    start = 0
    for req_id in out.req_ids:
        tokens, computed = before[req_id]
        n = plan[req_id]
        ref = hf_logits(hf, tokens[: computed + n])[computed : computed + n]
        got = logits[start : start + n]
        torch.testing.assert_close(got, ref, atol=atol, rtol=0, msg=prefixed(req_id))
        assert out.sampled_token_ids[out.req_id_to_index[req_id]] == [int(ref[-1].argmax())]
        start += n


def check_greedy(hf: Any, path: Path, vocab_size: int, **runner_kwargs: Any) -> None:
    check_greedy_runner(make_runner(path, max_num_batched_tokens=16, **runner_kwargs), hf, vocab_size)


def check_greedy_runner(runner: ModelRunner, ref: Any, vocab_size: int, max_tokens: int = 32) -> None:
    """`check_greedy` on a runner made by the caller (16-token budget), against the reference model `ref`."""
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(1, vocab_size, (n,), generator=gen).tolist() for n in (3, 12, 30)]
    sched = FakeScheduler(runner, seed=5)
    for i, prompt in enumerate(prompts):
        sched.add(f"r{i}", prompt, max_tokens=max_tokens)
    got = sched.run(budget=16)
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            expected = ref.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()  # fmt: skip
        assert got[f"r{i}"] == expected, f"prompt {i}: treadle {got[f'r{i}']} != reference {expected}"
