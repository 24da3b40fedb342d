"""Each 4-bit format's packing read on hand-made words (quantization/int4_formats.py), for the cases the model tests
do not reach: AWQ's interleaved nibble order word by word, a GPTQ v1 zero point stored as 15 (zero 0 minus one, in
four bits) read back as 16 as vLLM reads it, compressed-tensors zero points packed along the outputs."""

from __future__ import annotations

import torch
from int4_checkpoints import AWQ_ORDER

from treadle_ir.ops.int4 import unpack_int4_rows
from treadle_model_runner.quantization.int4_formats import to_layout
from treadle_model_runner.quantization.int4_scheme import Int4CheckpointScheme


def _scheme(method: str, **fields: object) -> Int4CheckpointScheme:
    values = {"group_size": 8, "symmetric": False, "act_order": False, "zero_offset": 0, "targets": ("Linear",),
              "ignore": (), "skip_substrings": (), "only_substrings": None, "has_kv_cache_scales": False}  # fmt: skip
    return Int4CheckpointScheme(method, **{**values, **fields})  # type: ignore[arg-type]


def _word(nibbles: list[int]) -> int:
    word = sum(v << (4 * i) for i, v in enumerate(nibbles))
    return word - (1 << 32) if word >= 1 << 31 else word


def test_awq_nibble_i_holds_column_8c_plus_order_i() -> None:
    # 8 input rows, 8 output columns: nibble i of row r's word is 8 * r + i, so the code names its place in the word
    qweight = torch.tensor(
        [[_word([(8 * r + i) % 16 for i in range(8)])] for r in range(8)], dtype=torch.int32
    )
    qzeros = torch.tensor([[_word([1, 2, 3, 4, 5, 6, 7, 8])]], dtype=torch.int32)
    layout = to_layout(
        _scheme("awq"), "m", {"qweight": qweight, "qzeros": qzeros, "scales": torch.ones(1, 8)}
    )
    q = unpack_int4_rows(layout["packed_weight"])  # [k, n]
    for r in range(8):
        for i in range(8):
            assert int(q[r, AWQ_ORDER[i]]) == (8 * r + i) % 16
    assert layout["group_zero"][0].tolist() == [1 + AWQ_ORDER.index(c) for c in range(8)]


def test_gptq_v1_zero_points_are_read_plus_one_even_past_15() -> None:
    qweight = torch.tensor([[_word([3] * 8)] * 8], dtype=torch.int32)  # [k / 8 = 1, n = 8]
    qzeros = torch.tensor([[_word([15, 0, 7, 14, 1, 2, 3, 4])]], dtype=torch.int32)
    tensors = {"qweight": qweight, "qzeros": qzeros, "scales": torch.ones(1, 8)}
    v1 = to_layout(_scheme("gptq", zero_offset=1), "m", tensors)
    assert v1["group_zero"][0].tolist() == [16, 1, 8, 15, 2, 3, 4, 5]
    v2 = to_layout(_scheme("gptq"), "m", tensors)
    assert v2["group_zero"][0].tolist() == [15, 0, 7, 14, 1, 2, 3, 4]
    assert torch.equal(v1["packed_weight"], qweight)  # GPTQ's qweight is the layout itself
    assert "group_zero" not in to_layout(_scheme("gptq", symmetric=True), "m", tensors)


def test_compressed_tensors_rows_and_zero_points() -> None:
    # 2 outputs, 16 inputs; zero points packed along the 8 outputs of 2 groups
    n, k = 8, 16
    codes = torch.arange(n * k).reshape(n, k) % 16
    packed = torch.tensor([[_word(codes[c, 8 * i : 8 * i + 8].tolist()) for i in range(2)] for c in range(n)])
    zero_point = torch.tensor([[_word([g * 8 + c for c in range(8)]) for g in range(2)]], dtype=torch.int32)
    tensors = {"weight_packed": packed.to(torch.int32), "weight_scale": torch.ones(n, 2),
               "weight_zero_point": zero_point, "weight_shape": torch.tensor([n, k])}  # fmt: skip
    layout = to_layout(_scheme("compressed-tensors"), "m", tensors)
    assert torch.equal(unpack_int4_rows(layout["packed_weight"]).t(), codes.to(torch.int32))
    assert layout["group_zero"].tolist() == [[c for c in range(8)], [8 + c for c in range(8)]]
    assert layout["group_scale"].shape == (2, n)
