"""gpt-oss's MXFP4 experts kept 4-bit (quantization/mxfp4_experts.py, treadle_moe's MXFP4 layout) rather than
dequantized at load.

On the CPU the model dequantizes them (no MXFP4 kernel there); these tests make the CPU count as a native device
(`NATIVE_DEVICE_TYPES`), so the experts stay 4-bit and the oracle runs the torch reference on them, which must give
HF's logits on the same (MXFP4-rounded) weights, as the dequantized path does. TREADLE_MXFP4_DEQUANTIZE=1 takes the
dequantized path back. Dummy weights with the released quantization_config quantize their random experts at load.
The refusals: a plain checkpoint under an mxfp4 config.json, an expert width not in blocks of 32. On a GPU (marked
gpu): the tiny model's native experts on the Triton MXFP4 kernel against HF within fp32 tolerance, greedy equal,
eagerly and with CUDA graphs.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from model_parity import check_greedy, check_mixed_batch
from test_models_gpt_oss import CONFIG, MXFP4_CONFIG, VOCAB, tiny_hf
from test_models_gpt_oss_mxfp4 import _mxfp4_checkpoint
from test_runner_fakes import FakeScheduler, make_runner

from treadle_model_runner.loader import iterate_weights, make_dummy_model_dir
from treadle_model_runner.models.gpt_oss import GptOssForCausalLM
from treadle_model_runner.quantization import mxfp4_experts
from treadle_moe import FusedMoE
from treadle_moe.experts.mxfp4 import dequantize_mxfp4


@pytest.fixture
def native_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mxfp4_experts, "NATIVE_DEVICE_TYPES", frozenset({"cpu", "cuda"}))
    monkeypatch.setenv("TREADLE_MXFP4_DEQUANTIZE", "0")


@pytest.fixture(scope="module")
def tiny_mxfp4(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    hf = tiny_hf()
    path = tmp_path_factory.mktemp("gpt_oss_mxfp4_native")
    _mxfp4_checkpoint(hf, path)
    return hf, path


def _experts(runner: Any) -> list[FusedMoE]:
    return [m for m in runner._require_model().modules() if isinstance(m, FusedMoE)]


@pytest.mark.usefixtures("native_on_cpu")
def test_kept_4bit_matches_hf(tiny_mxfp4: tuple[Any, Path], caplog: pytest.LogCaptureFixture) -> None:
    hf, path = tiny_mxfp4
    with caplog.at_level(logging.INFO, logger="treadle_model_runner"):
        check_mixed_batch(hf, path, VOCAB)
    lines = [m for m in caplog.messages if "gpt-oss MXFP4 experts (8 matrices" in m]
    assert len(lines) == 1 and "kept 4-bit" in lines[0], caplog.messages
    check_greedy(hf, path, VOCAB)


@pytest.mark.usefixtures("native_on_cpu")
def test_loaded_layout_and_the_dequantize_switch(
    tiny_mxfp4: tuple[Any, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, path = tiny_mxfp4
    config = tf.GptOssConfig.from_pretrained(path)
    native = GptOssForCausalLM(config)
    with torch.no_grad():
        native.load_weights(iterate_weights(path, "safetensors"))
    moe = native.model.layers[1].mlp.experts
    n, k = CONFIG["intermediate_size"], CONFIG["hidden_size"]
    assert moe.mxfp4_layout is not None and moe.w13_weight.dtype == torch.uint8
    assert moe.w13_weight.shape == (8, 2 * n, k // 32, 16) and moe.w2_weight.shape == (8, k, n // 32, 16)
    monkeypatch.setenv("TREADLE_MXFP4_DEQUANTIZE", "1")
    plain = GptOssForCausalLM(config)
    with torch.no_grad():
        plain.load_weights(iterate_weights(path, "safetensors"))
    plain_moe = plain.model.layers[1].mlp.experts
    assert plain_moe.mxfp4_layout is None and plain_moe.w13_weight.dtype == torch.float32
    # the same experts: gate rows then up rows, de-interleaved while bytes
    x, logits = torch.randn(5, k), torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(moe(x, logits), plain_moe(x, logits), atol=0, rtol=0)


@pytest.mark.usefixtures("native_on_cpu")
def test_dummy_weights_are_quantized_at_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = {**tf.GptOssConfig(**CONFIG).to_dict(), "quantization_config": MXFP4_CONFIG}
    with caplog.at_level(logging.INFO, logger="treadle_model_runner"):
        runner = make_runner(make_dummy_model_dir(config, tmp_path), load_format="dummy")
    lines = [m for m in caplog.messages if "dummy weights, random experts quantized at load" in m]
    assert len(lines) == 1 and "kept 4-bit" in lines[0], caplog.messages
    experts = _experts(runner)
    assert len(experts) == CONFIG["num_hidden_layers"]
    for moe in experts:
        assert moe.w13_weight.dtype == torch.uint8 and moe.w13_weight_scale is not None
        # random N(0, 0.02^2) experts quantized: their dequantized values keep that spread
        weights = dequantize_mxfp4(moe.w13_weight, moe.w13_weight_scale, torch.float32)
        assert 0.015 < float(weights.std()) < 0.025
        assert moe.w13_bias is not None and float(moe.w13_bias.abs().max()) == 0
    assert not torch.equal(experts[0].w13_weight, experts[1].w13_weight)
    sched = FakeScheduler(runner, seed=1)
    sched.add("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], max_tokens=8)
    assert len(sched.run(budget=16)["a"]) == 8


@pytest.mark.usefixtures("native_on_cpu")
def test_plain_checkpoint_under_an_mxfp4_config_is_refused(tmp_path: Path) -> None:
    hf = tiny_hf()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": MXFP4_CONFIG}))
    model = GptOssForCausalLM(tf.GptOssConfig.from_pretrained(tmp_path))
    refused = r"experts\.(gate_up|down)_proj.*not MXFP4.*TREADLE_MXFP4_DEQUANTIZE=1"
    with torch.no_grad(), pytest.raises(ValueError, match=refused):
        model.load_weights(iterate_weights(tmp_path, "safetensors"))


@pytest.mark.usefixtures("native_on_cpu")
def test_expert_width_not_in_blocks_of_32_is_refused() -> None:
    config = tf.GptOssConfig(**{**CONFIG, "intermediate_size": 48, "quantization_config": MXFP4_CONFIG})
    with pytest.raises(ValueError, match=r"expert width \(48\) must be multiples of 32"):
        GptOssForCausalLM(config)


def test_bad_switch_value_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TREADLE_MXFP4_DEQUANTIZE", "maybe")
    config = tf.GptOssConfig(**{**CONFIG, "quantization_config": MXFP4_CONFIG})
    with pytest.raises(ValueError, match="TREADLE_MXFP4_DEQUANTIZE='maybe' is not a boolean"):
        mxfp4_experts.keeps_mxfp4(config, torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
def test_gpu_native_experts_match_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, eager: bool) -> None:
    """The tiny model with head_dim 64 and its experts kept 4-bit on the Triton MXFP4 kernel (fp32 activations): a
    mixed step within 2e-3 of HF on the MXFP4-rounded weights (what the dequantized path computes), greedy equal,
    eagerly and with CUDA graphs; TREADLE_MXFP4_DEQUANTIZE=1 passes the same checks."""
    monkeypatch.setenv("TREADLE_MXFP4_DEQUANTIZE", "0")
    hf = tiny_hf(head_dim=64)
    path = tmp_path / "ckpt"
    _mxfp4_checkpoint(hf, path)
    runner = dict(device="cuda", enforce_eager=eager, block_size=16, num_blocks=64, max_model_len=128)
    built = make_runner(path, **runner)
    assert all(m.w13_weight.dtype == torch.uint8 for m in _experts(built))
    assert "mxfp4" in str(built._require_model().model.layers[0].mlp.experts)
    del built
    check_mixed_batch(hf, path, VOCAB, atol=2e-3, **runner)
    check_greedy(hf, path, VOCAB, **runner)
    monkeypatch.setenv("TREADLE_MXFP4_DEQUANTIZE", "1")
    check_mixed_batch(hf, path, VOCAB, atol=2e-3, **runner)
    shutil.rmtree(path)
    torch.cuda.empty_cache()


def test_by_default_experts_stay_4bit_only_when_they_would_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset (or auto), the switch dequantizes the experts when in the model dtype they take at most half the
    device's memory (the bf16 kernel is the faster one), and keeps them 4-bit when they would not fit so (gpt-oss-120b
    on one GPU); 1 and 0 override it either way; a device without the kernel always dequantizes."""
    monkeypatch.setattr(mxfp4_experts, "NATIVE_DEVICE_TYPES", frozenset({"cpu", "cuda"}))
    config = tf.GptOssConfig(**{**CONFIG, "quantization_config": MXFP4_CONFIG})
    need = mxfp4_experts.dequantized_expert_bytes(config)
    # fp32, the default dtype here
    assert need == CONFIG["num_hidden_layers"] * CONFIG["num_local_experts"] * 3 * 64 * 64 * 4
    cpu = torch.device("cpu")
    for raw, memory, kept in [("auto", 2 * need, False), ("auto", 2 * need - 1, True), ("1", 1, False),
                              ("0", 1 << 40, True)]:  # fmt: skip
        monkeypatch.setenv("TREADLE_MXFP4_DEQUANTIZE", raw)
        monkeypatch.setattr(mxfp4_experts, "device_memory", lambda device, memory=memory: memory)
        assert mxfp4_experts.keeps_mxfp4(config, cpu) is kept, (raw, memory)
    monkeypatch.delenv("TREADLE_MXFP4_DEQUANTIZE")
    monkeypatch.setattr(mxfp4_experts, "device_memory", lambda device: 2 * need - 1)
    assert mxfp4_experts.keeps_mxfp4(config, cpu) is True
    monkeypatch.setattr(mxfp4_experts, "NATIVE_DEVICE_TYPES", frozenset({"cuda"}))
    assert mxfp4_experts.keeps_mxfp4(config, cpu) is False
