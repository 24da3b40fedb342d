"""Unseeded sampling with drafts, statistically: verification must not change the distribution of the text.

Every request here verifies the drafts d1, d2 from the same logits: row 0 (no draft taken), row 1 (d1 taken) and
row 2 (d1 d2 taken). The emitted tokens are row 0's sample, then row 1's if row 0 drew d1, then row 2's if row 1
drew d2 (runner/spec_decode.accepted_runs). A plain run would draw the first token from p0 = softmax(row 0), the
second, after d1, from p1, the third, after d1 d2, from p2, each with fresh noise. So the first emitted token must
follow p0, the second (given the first was d1) p1, the third (given d1 d2) p2: a chi-square test of each against
its law over thousands of requests. Noise shared by a request's rows would bias the later samples toward the
draft that won row 0 (the negative control below shows the test sees that); noise keyed like seeded rows would
repeat between steps.

Tokens come from the Sampler with the metadata expand_for_drafts builds, on the general path (temperature with
top-p, CPU and GPU) and on the fused Gumbel path (plain temperature; CUDA only).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from treadle_model_runner.runner.spec_decode import accepted_runs
from treadle_model_runner.sample import Sampler, SamplingMetadata
from treadle_model_runner.sample.drafts import expand_for_drafts
from treadle_model_runner.sampling_params import SamplingParams

VOCAB = 7  # six degrees of freedom: the chi-square tail has a closed form
DRAFTS = [3, 5]
NUM_REQS = 12_000
ALPHA = 1e-6  # false alarm rate of one check

_NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, _NO_GPU])]


def _chi2_sf_df6(x: float) -> float:
    """P(X > x) for X ~ chi-square with 6 degrees of freedom."""
    h = x / 2
    return math.exp(-h) * (1 + h + h * h / 2)


def _chi2(tokens: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(tokens, minlength=VOCAB)
    expected = probs * tokens.size
    return float(((counts - expected) ** 2 / expected).sum())


def _row_logits() -> torch.Tensor:
    """Rows 0-2: d1 likely at row 0, d2 likely at row 1, every token possible everywhere."""
    logits = torch.zeros(3, VOCAB)
    logits[0, DRAFTS[0]] = 1.5
    logits[1, DRAFTS[1]] = 1.2
    logits[1, DRAFTS[0]] = -0.5
    logits[2] = torch.linspace(-0.6, 0.6, VOCAB)
    return logits


def _emitted(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first, second (after d1) and third (after d1 d2) emitted tokens of every request."""
    drafts = [DRAFTS] * NUM_REQS
    _, count = accepted_runs(tokens, drafts)
    rows = tokens.reshape(NUM_REQS, 3)
    return rows[:, 0], rows[count >= 2, 1], rows[count >= 3, 2]


def _assert_follows(emitted: tuple[np.ndarray, ...], probs: torch.Tensor) -> None:
    for i, (tokens, p) in enumerate(zip(emitted, probs.numpy(), strict=True)):
        assert tokens.size > 1_000, f"too few requests reach emitted token {i}"
        stat = _chi2(tokens, p)
        assert _chi2_sf_df6(stat) > ALPHA, (
            f"emitted token {i}: chi-square {stat:.1f} over {tokens.size} samples"
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["general", "fused"])
def test_unseeded_drafts_keep_the_distribution(device: str, path: str) -> None:
    if path == "fused" and device == "cpu":
        pytest.skip("the fused Gumbel sampler runs on CUDA only")
    torch.manual_seed(1234)
    # general: top_p < 1 sends the batch through masks and truncation; fused: untouched rows, one kernel
    params = SamplingParams(temperature=0.8, top_p=0.999999 if path == "general" else 1.0)
    prompt, outputs = [1, 2, 4], [6]
    md = SamplingMetadata.build([params] * NUM_REQS, [prompt] * NUM_REQS, [outputs] * NUM_REQS,
                                [len(prompt) + len(outputs)] * NUM_REQS, VOCAB, device)  # fmt: skip
    md = expand_for_drafts(md, [params] * NUM_REQS, [outputs] * NUM_REQS, [DRAFTS] * NUM_REQS)
    logits = _row_logits().to(device).repeat(NUM_REQS, 1)
    tokens = Sampler()(logits, md).sampled_token_ids.cpu().numpy()
    _assert_follows(_emitted(tokens), torch.softmax(_row_logits() / 0.8, dim=-1))


def test_the_check_sees_noise_shared_by_a_requests_rows() -> None:
    """Negative control: the same Gumbel noise on all three rows of a request biases the second and third tokens
    toward the drafts that won before (conditioning on d1 selects noise that favours d1 everywhere)."""
    gen = torch.Generator().manual_seed(99)
    noise = -torch.log(torch.rand(NUM_REQS, 1, VOCAB, generator=gen))
    logits = (_row_logits() / 0.8).unsqueeze(0)
    tokens = (logits - noise.log()).argmax(-1).reshape(-1).numpy()
    first, second, _ = _emitted(tokens)
    probs = torch.softmax(_row_logits() / 0.8, dim=-1).numpy()
    assert _chi2_sf_df6(_chi2(first, probs[0])) > ALPHA  # row 0 alone is still right
    assert _chi2_sf_df6(_chi2(second, probs[1])) < ALPHA
