"""`quantization="fp8"` (online fp8) against an independent fp8 reference on tiny random HF models (CPU, fp32).

The reference (fp8_reference.py) is the HF model with its projections' forwards patched to quantize weights per
output channel and activations per token with torch's own e4m3 cast. For Llama (attention and MLP biases), Qwen3
(q/k norms) and Gemma 3 (GELU, sliding window, softcapping), through the ModelRunner: a step mixing a fresh
prefill, a chunked prefill and decodes gives logits within 1e-4 of the reference's, while the unquantized model is
far from both; greedy continuations equal the reference's `generate`. The projections hold float8_e4m3fn weights
with fp32 per-channel scales, the embedding and lm_head do not; dummy weights are quantized after the fill; LoRA
adapters run on an fp8 base (against PEFT on the fp8 reference). Refused: unknown methods. MoE models (their experts
quantized too): test_quantization_fp8_moe.py.
Pre-quantized fp8 checkpoints: test_quantization_fp8_checkpoint.py (which reuses the checks here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from fp8_reference import fp8_reference
from model_parity import check_greedy_runner
from test_models import COMMON, _config
from test_runner_fakes import FakeScheduler, make_runner, perturb_, record_hidden

from treadle_model_runner.config import LoRAConfig, ModelConfig
from treadle_model_runner.layers.linear import Linear
from treadle_model_runner.loader import make_dummy_model_dir
from treadle_model_runner.quantization import weight_bytes
from treadle_model_runner.runner import ModelRunner

ARCHS = ["llama", "qwen3", "gemma3"]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    config, cls = _config(request.param)
    torch.manual_seed(ARCHS.index(request.param))
    hf = cls(config).eval()
    perturb_(hf, seed=1, std=0.15)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    return hf, fp8_reference(hf), path


def _logits(model: Any, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def test_mixed_batch_logits_match_the_fp8_reference(tiny: tuple[Any, Any, Path]) -> None:
    hf, ref, path = tiny
    check_mixed_batch_logits(make_runner(path, quantization="fp8"), ref, hf)


def check_mixed_batch_logits(runner: ModelRunner, ref: Any, hf: Any, max_flipped: int = 0) -> None:
    """A step mixing a chunked prefill, a fresh prefill and decodes: the runner's logits are within 1e-4 of the
    reference model's `ref`, and far from the unquantized model `hf`'s.

    `max_flipped` positions (of 26) may instead be within 5e-3: where the runner and the reference sum a matmul in
    another order (another batch shape), a quantized activation may round to the neighbouring e4m3 step in one of
    them, an eighth of that value; a MoE model quantizes more activations (each expert's two inputs) than a dense one.
    """
    gen = torch.Generator().manual_seed(7)
    prompts = {name: torch.randint(1, 160, (n,), generator=gen).tolist()
               for name, n in {"chunked": 23, "b": 5, "c": 7, "fresh": 11}.items()}  # fmt: skip
    sched = FakeScheduler(runner, seed=3)
    for name, prompt in prompts.items():
        sched.add(name, prompt, max_tokens=4)
    sched.step({"chunked": 10, "b": 5, "c": 7})
    hidden = record_hidden(runner)
    before = {name: (list(r.prompt + r.output), r.num_computed) for name, r in sched.requests.items()}
    plan = {"chunked": 13, "fresh": 11, "b": 1, "c": 1}
    out = sched.step(plan)
    with torch.no_grad():
        logits = runner._require_model().compute_logits(hidden[0]).float()
    start, far, flipped = 0, 0.0, []
    for req_id in out.req_ids:
        tokens, computed = before[req_id]
        n = plan[req_id]
        expected = _logits(ref, tokens[: computed + n])[computed : computed + n]
        got = logits[start : start + n]
        if max_flipped:
            diff = (got - expected).abs().amax(dim=-1)  # [n] per position
            flipped += [(req_id, i, float(d)) for i, d in enumerate(diff) if d > 1e-4]
            torch.testing.assert_close(got, expected, atol=5e-3, rtol=0, msg=lambda m, r=req_id: f"{r}: {m}")
        else:
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0, msg=lambda m, r=req_id: f"{r}: {m}")
        far = max(
            far, float((got - _logits(hf, tokens[: computed + n])[computed : computed + n]).abs().max())
        )
        start += n
    assert len(flipped) <= max_flipped, f"positions beyond 1e-4 of the reference: {flipped}"
    assert far > 1e-2, f"fp8 logits within {far} of the unquantized model's: nothing was quantized"


def test_greedy_continuations_match_the_fp8_reference(tiny: tuple[Any, Any, Path]) -> None:
    _, ref, path = tiny
    check_greedy_continuations(make_runner(path, max_num_batched_tokens=16, quantization="fp8"), ref)


def check_greedy_continuations(runner: ModelRunner, ref: Any) -> None:
    """Three prompts decoded greedily for 24 tokens in 16-token steps equal the reference model's `generate`."""
    check_greedy_runner(runner, ref, 160, max_tokens=24)


def test_projections_hold_fp8_and_the_rest_does_not(tiny: tuple[Any, Any, Path]) -> None:
    _, _, path = tiny
    plain = make_runner(path)._require_model()
    model = make_runner(path, quantization="fp8")._require_model()
    projections = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(projections) == 4 * model.config.num_hidden_layers  # qkv, o, gate_up, down
    for m in projections:
        assert m.weight.dtype == torch.float8_e4m3fn and not m.fusable
        assert m.weight_scale is not None and m.weight_scale.dtype == torch.float32
        assert m.weight_scale.shape == (m.out_features,)
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    saved = sum(m.weight.numel() * 3 - m.out_features * 4 for m in projections)  # fp32 -> fp8 + scales
    assert weight_bytes(plain) - weight_bytes(model) == saved


def test_dummy_weights_are_quantized_after_the_fill(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = tf.LlamaConfig(**COMMON)
    path = make_dummy_model_dir(config, tmp_path / "dummy")
    with caplog.at_level("WARNING", logger="treadle_model_runner"):
        model = make_runner(path, load_format="dummy", quantization="fp8")._require_model()
    assert (
        "fp8 projections on the CPU run the reference path" in caplog.text
    )  # slow there: said once, at load
    plain = make_runner(path, load_format="dummy")._require_model()
    for (name, m), (_, p) in zip(model.named_modules(), plain.named_modules(), strict=True):
        if isinstance(m, Linear):
            assert m.weight_scale is not None, name
            deq = m.weight.float() * m.weight_scale[:, None]
            # within half an e4m3 step (2^-4 relative at the row's largest value) of the dummy fill
            bound = m.weight_scale[:, None] * 448 * 2**-4
            assert bool(((deq - p.weight).abs() <= bound).all()), name


def test_lora_runs_on_an_fp8_base(tmp_path: Path) -> None:
    """An adapter on every projection of an fp8 Llama: logits equal PEFT's on the fp8 reference."""
    from lora_fixtures import PeftReference, save_adapter

    from treadle_model_runner.lora import LoRARequest

    # base weights from a fixed seed, not the global RNG's state: greedy parity needs no near-tie in the top logits
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON)).eval()
    perturb_(hf, seed=4, std=0.15)
    hf.save_pretrained(tmp_path / "base", safe_serialization=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter = save_adapter(hf, tmp_path / "a", seed=2, r=8, alpha=16, targets=targets)
    peft = PeftReference(fp8_reference(hf), {"a": adapter})
    lora = LoRAConfig(enable_lora=True, max_loras=1, max_lora_rank=8)
    runner = make_runner(tmp_path / "base", quantization="fp8", lora_config=lora)
    prompt = torch.randint(1, 160, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    sched = FakeScheduler(runner, seed=1)
    sched.add("a", prompt, max_tokens=6, lora_request=LoRARequest("a", 1, str(adapter)))
    sched.add("base", prompt, max_tokens=6)
    got = sched.run(budget=32)
    assert got["a"] == peft.greedy("a", prompt, 6)
    assert got["base"] == peft.greedy(None, prompt, 6)


def test_unknown_method_lists_the_supported_ones() -> None:
    with pytest.raises(ValueError, match=r"quantization 'bitsandbytes' is not supported; supported: fp8"):
        ModelConfig(model="x", quantization="bitsandbytes")
    assert ModelConfig(model="x", quantization="fp8").quantization == "fp8"
    assert ModelConfig(model="x", quantization="awq").quantization == "awq"  # a 4-bit checkpoint's method
