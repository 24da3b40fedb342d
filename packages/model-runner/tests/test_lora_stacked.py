"""LoRA adapters on Phi-3's stacked projections (CPU, fp32): a Phi-3 checkpoint holds `qkv_proj` and `gate_up_proj`
whole, and PEFT adapters trained on it target them whole (one lora_A [r, hidden], one lora_B [q + k + v rows, r]).

On tiny random Phi-3 models (test_models.py's "phi3": longrope on its short factors, a sliding window; "phi4_mini":
partial rotary, tied embeddings) with two PEFT adapters, one on qkv_proj, o_proj, gate_up_proj and down_proj at rank
8, one rsLoRA adapter on qkv_proj and gate_up_proj only at rank 4, the mixed batch of test_lora_parallel.py (base
rows and both adapters, a chunked prefill, decode steps) is run by the ModelRunner: every scheduled position's
logits are within 1e-4 of the HF model with that request's adapter merged into its weights, and the greedy
continuations equal its `generate`. Adapters a Phi-3 model cannot run are refused with the file and the problem
named: q_proj / k_proj / v_proj (or gate_proj / up_proj) apart, as vLLM refuses them on Phi-3, naming the stacked
module to target instead; modules_to_save and embedding / lm_head targets, as on every model; and a qkv_proj adapter
on a Llama, which has no such module in its checkpoint.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from lora_fixtures import MergedReference, save_adapter, write_adapter
from test_lora_parallel import _run, check_run
from test_models import COMMON, RUNNER_KWARGS, _config
from test_runner_fakes import make_runner, perturb_

from treadle_model_runner.config import LoRAConfig
from treadle_model_runner.lora import LoRARequest

PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@dataclass
class Tiny:
    arch: str
    path: Path  # the base model, HF format
    hf: Any
    adapters: dict[str, Path]
    requests: dict[str, LoRARequest]


@pytest.fixture(scope="module", params=["phi3", "phi4_mini"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    config, cls = _config(request.param)
    torch.manual_seed(0)
    hf = cls(config).eval()
    perturb_(hf, seed=1, std=0.15)
    root = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(root / "base", safe_serialization=True)
    adapters = {
        "a": save_adapter(hf, root / "a", seed=2, r=8, alpha=16, targets=PHI3_TARGETS),
        "b": save_adapter(hf, root / "b", seed=3, r=4, alpha=6, targets=["qkv_proj", "gate_up_proj"],
                          use_rslora=True),
    }  # fmt: skip
    requests = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(adapters.items())}
    return Tiny(request.param, root / "base", hf, adapters, requests)


def _lora_runner(tiny: Tiny) -> Any:
    lora_config = LoRAConfig(enable_lora=True, max_loras=1, max_lora_rank=8)
    return make_runner(tiny.path, lora_config=lora_config, **RUNNER_KWARGS.get(tiny.arch, {}))


def test_mixed_batch_matches_hf_with_the_adapters_merged(tiny: Tiny) -> None:
    run = _run(tiny.path, tiny.requests, tp=1, **RUNNER_KWARGS.get(tiny.arch, {}))
    check_run(run, run, MergedReference(tiny.hf, tiny.adapters), tiny.arch)


def test_stacked_projections_take_one_adapter_over_all_their_rows(tiny: Tiny) -> None:
    """The premise of the test above: the adapter holds one A and one B for each stacked projection (PEFT's files),
    and the runner gives each a single-shard slot set answering to the stacked module's own name."""
    from safetensors.torch import load_file

    tensors = load_file(tiny.adapters["a"] / "adapter_model.safetensors")
    config = tiny.hf.config
    head_dim = config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    qkv_rows = q + 2 * kv
    key = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"
    assert tuple(tensors[key].shape) == (qkv_rows, 8)
    runner = _lora_runner(tiny)
    assert runner.lora is not None
    targets = runner.lora.targets
    assert set(targets) == {f"model.layers.{i}.{m}" for i in range(2) for m in
                            ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}  # fmt: skip
    qkv = targets["model.layers.0.self_attn.qkv_proj"]
    assert qkv.slots.num_shards == 1 and qkv.out_features == qkv_rows
    assert qkv.rows == (
        slice(0, q),
        slice(q, q + kv),
        slice(q + kv, qkv_rows),
    )  # one rank: all of them, q, k, v


# ---- adapters a Phi-3 model cannot run ------------------------------------------------------------------------
def _edit_config(path: Path, **changes: Any) -> None:
    config_file = path / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **changes}))


PARTS_APART = r"holds (qkv_proj|gate_up_proj) stacked, so an adapter trained on it targets \1 whole"
REFUSED = {
    "q_k_v_apart": (lambda t, p: write_adapter(p, t.hf.config, 5, 4, 8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
                    r"tensor .*[qkv]_proj\.lora_A\.weight' adapts module 'model\.layers\.0\.self_attn\.[qkv]_proj', which "
                    r"Phi3ForCausalLM does not have as a LoRA-capable projection; its target modules: qkv_proj, "
                    r"o_proj, gate_up_proj, down_proj \(.*" + PARTS_APART),
    "up_apart": (lambda t, p: write_adapter(p, t.hf.config, 5, 4, 8, ["up_proj"]), r"up_proj'.*" + PARTS_APART),
    "modules_to_save": (lambda t, p: _edit_config(shutil.copytree(t.adapters["a"], p), modules_to_save=["lm_head"]),
                        r"adapter_config\.json: modules_to_save = \['lm_head'\] is not supported"),
    "embedding_target": (lambda t, p: _edit_config(shutil.copytree(t.adapters["a"], p),
                                                   target_modules=["qkv_proj", "embed_tokens"]),
                         r"adapter_config\.json: target module 'embed_tokens' is not supported"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED))
def test_adapter_phi3_cannot_run_is_refused_by_name(tiny: Tiny, tmp_path: Path, case: str) -> None:
    runner = _lora_runner(tiny)
    make, message = REFUSED[case]
    make(tiny, tmp_path / "bad")
    with pytest.raises(ValueError, match=message):
        runner.add_lora(LoRARequest("bad", 7, str(tmp_path / "bad")))
    assert runner.add_lora(tiny.requests["a"]) is True and runner.list_loras() == [1]


def test_stacked_adapter_on_llama_is_refused(tmp_path: Path) -> None:
    """Llama's checkpoint holds q_proj, k_proj and v_proj apart: an adapter on qkv_proj matches nothing of it."""
    config = tf.LlamaConfig(**COMMON)
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path / "base", safe_serialization=True)
    adapter = write_adapter(tmp_path / "qkv", config, 1, 4, 8, ["qkv_proj"])
    runner = make_runner(
        tmp_path / "base", lora_config=LoRAConfig(enable_lora=True, max_loras=1, max_lora_rank=8)
    )
    with pytest.raises(ValueError, match=r"adapts module 'model\.layers\.0\.self_attn\.qkv_proj', which "
                                         r"LlamaForCausalLM does not have .*; its target modules: q_proj, k_proj, "
                                         r"v_proj, o_proj, gate_proj, up_proj, down_proj$"):  # fmt: skip
        runner.add_lora(LoRARequest("qkv", 1, str(adapter)))
