"""Workspace manager, block configs, weight-and-reduce strategies."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from treadle_moe import (
    WeightAndReduceContiguous,
    WeightAndReduceDelegate,
    WeightAndReduceNoOp,
    WorkspaceManager,
)
from treadle_moe.configs import (
    CONFIG_DIR,
    BlockConfig,
    fallback_config,
    get_block_config,
    load_device_configs,
    shape_key,
)


def test_workspace_reuses_and_grows() -> None:
    ws = WorkspaceManager()
    a = ws.get("a", (4, 8), torch.float32, torch.device("cpu"))
    a2 = ws.get("a", (2, 8), torch.bfloat16, torch.device("cpu"))
    assert a2.data_ptr() == a.data_ptr() and a2.shape == (2, 8) and a2.dtype == torch.bfloat16
    b = ws.get("b", (4, 8), torch.float32, torch.device("cpu"))
    assert b.data_ptr() != a.data_ptr(), "different names never alias"
    big = ws.get("a", (64, 64), torch.float32, torch.device("cpu"))
    # the outgrown "a" stays alive (a CUDA graph captured on it still uses it at every replay)
    assert big.numel() == 64 * 64 and ws.num_bytes == 64 * 64 * 4 + 4 * 8 * 4 + 4 * 8 * 4
    assert [r.data_ptr() for r in ws.retired] == [a.data_ptr()]
    assert ws.get("a", (8,), torch.float32, torch.device("cpu")).data_ptr() == big.data_ptr(), "never shrinks"
    ws.clear()
    assert ws.num_bytes == 0


def test_config_files_parse_and_are_valid() -> None:
    files = sorted(CONFIG_DIR.glob("*.json"))
    assert files, "at least one tuned device file ships"
    for path in files:
        data = json.loads(path.read_text())
        tables = load_device_configs(data["device_name"])
        assert tables and all(
            isinstance(cfg, BlockConfig) for table in tables.values() for cfg in table.values()
        )


def test_config_lookup_nearest_and_fallback() -> None:
    config, source = get_block_config(200, 128, 768, 2048, 8, torch.bfloat16, "NVIDIA H200")
    assert "M=256" in source
    assert config == load_device_configs("NVIDIA H200")["E=128,N=768,K=2048,dtype=bfloat16"][256]
    config, source = get_block_config(200, 64, 512, 1024, 8, torch.bfloat16, "NVIDIA H200")
    assert source == "fallback heuristic" and config == fallback_config(200, 8, 64)
    assert fallback_config(1, 8, 128).block_m == 16 and fallback_config(8192, 8, 128).block_m >= 64
    with pytest.raises(ValueError, match="power of two"):
        BlockConfig(24, 64, 64)


def test_int4_experts_take_their_own_table_else_the_activation_dtype_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from treadle_moe import Int4Layout, MoEProblem, configs, select_moe_kernel

    def entry(block_m: int, block_n: int, block_k: int) -> dict[str, int]:
        return BlockConfig(block_m, block_n, block_k).to_json()

    shapes = {  # 4-bit and bf16 tables for E=8 experts, bf16 alone for E=16
        shape_key(8, 64, 128, torch.bfloat16): {"1": entry(16, 32, 64), "64": entry(32, 32, 64)},
        shape_key(8, 64, 128, torch.bfloat16, int4=True): {"1": entry(16, 64, 32), "64": entry(64, 64, 32)},
        shape_key(16, 64, 128, torch.bfloat16): {"1": entry(16, 128, 64)},
    }
    (tmp_path / "Test_GPU.json").write_text(json.dumps({"device_name": "Test GPU", "shapes": shapes}))
    monkeypatch.setattr(configs, "CONFIG_DIR", tmp_path)
    load_device_configs.cache_clear()
    try:
        config, source = get_block_config(50, 8, 64, 128, 2, torch.bfloat16, "Test GPU", int4=True)
        assert config == BlockConfig(64, 64, 32) and source == "tuned Test_GPU.json (4-bit, M=64)"
        config, source = get_block_config(50, 8, 64, 128, 2, torch.bfloat16, "Test GPU")
        assert config == BlockConfig(32, 32, 64) and source == "tuned Test_GPU.json (M=64)"
        config, source = get_block_config(1, 16, 64, 128, 2, torch.bfloat16, "Test GPU", int4=True)
        assert config == BlockConfig(16, 128, 64) and source == "tuned Test_GPU.json (M=1)"
        # the oracle reports the 4-bit table's configs (BLOCK_K within the group size of 32)
        pytest.importorskip("triton")
        monkeypatch.delenv("TREADLE_MOE_BACKEND", raising=False)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
        problem = MoEProblem(
            8, 2, 128, 64, torch.bfloat16, torch.device("cuda"), 64, int4=Int4Layout(32, False, False)
        )
        text = select_moe_kernel(problem).describe()
        assert "BLOCK_M=64 BLOCK_N=64 BLOCK_K=32" in text and "(tuned Test_GPU.json (4-bit, M=64))" in text
    finally:
        load_device_configs.cache_clear()


def test_expert_parallel_layers_take_the_routed_expert_count_configs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A rank holding 4 of 8 experts picks block configs as the 8-expert layer does (its experts see the load they
    would on one device): the 8-expert table, in the oracle's report and in the Triton experts it builds."""
    pytest.importorskip("triton")
    from treadle_moe import ExpertPlacement, FusedMoE, MoEProblem, TritonExperts, configs, select_moe_kernel

    table = {"1": BlockConfig(16, 32, 64).to_json(), "64": BlockConfig(32, 64, 64).to_json()}
    shapes = {shape_key(8, 64, 128, torch.bfloat16): table}
    (tmp_path / "Test_GPU.json").write_text(json.dumps({"device_name": "Test GPU", "shapes": shapes}))
    monkeypatch.setattr(configs, "CONFIG_DIR", tmp_path)
    monkeypatch.delenv("TREADLE_MOE_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    load_device_configs.cache_clear()
    try:
        local = MoEProblem(4, 2, 128, 64, torch.bfloat16, torch.device("cuda"), 64)
        assert "(fallback heuristic)" in select_moe_kernel(local).describe()  # no table for 4 experts
        choice = select_moe_kernel(dataclasses.replace(local, routed_experts=8))
        assert "BLOCK_M=32 BLOCK_N=64 BLOCK_K=64" in choice.describe()
        assert "(tuned Test_GPU.json (M=64))" in choice.describe()
        experts = choice.build().experts
        assert isinstance(experts, TritonExperts) and experts.config_experts == 8
    finally:
        load_device_configs.cache_clear()
    # the layer asks for it when it holds some of the experts (triton under the interpreter on CPU)
    layer = FusedMoE(8, 2, 128, 64, dtype=torch.float32, backend="triton",
                     placement=ExpertPlacement.linear(8, 1, 2))  # fmt: skip
    torch.nn.init.normal_(layer.w13_weight, std=0.1)
    torch.nn.init.normal_(layer.w2_weight, std=0.1)
    layer(torch.randn(3, 128), torch.randn(3, 8))
    built = layer._kernels[layer._last_key][1].experts  # type: ignore[index]
    assert isinstance(built, TritonExperts) and built.config_experts == 8


def test_weight_and_reduce_strategies() -> None:
    y = torch.randn(5, 3, 7)
    w = torch.rand(5, 3)
    ids = torch.zeros(5, 3, dtype=torch.int32)
    expected = (y * w[..., None]).sum(1)
    torch.testing.assert_close(WeightAndReduceContiguous().apply(None, y, w, ids), expected)
    out = torch.empty(5, 7)
    WeightAndReduceContiguous(weights_applied=True).apply(out, y * w[..., None], w, ids)
    torch.testing.assert_close(out, expected)
    reduced = expected.clone()
    assert WeightAndReduceNoOp().apply(reduced, reduced, w, ids) is reduced
    with pytest.raises(AssertionError):
        WeightAndReduceDelegate().apply(None, y, w, ids)
