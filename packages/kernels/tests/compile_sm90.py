"""Compile treadle's Triton kernels ahead of time for Hopper (sm_90) on a machine without a GPU.

Run as a script (a subprocess of test_compile_sm90.py, outside the interpreter mode the test session sets):
the Triton front end and ptxas run exactly as on an H100, so a kernel the interpreter accepts but the compiler
rejects (e.g. a variable typed differently in the two branches of an `if`) fails here, not on the device.
Signatures come from parameter names (`treadle_kernels.ops.support.compile_ahead`): `*_ptr` are pointers (bf16
unless listed), constexprs are given, float scalars are listed, everything else is i32.
"""

from __future__ import annotations

import sys

from treadle_kernels.attention import triton_decode_kernel as decode
from treadle_kernels.attention import triton_kernel as attn
from treadle_kernels.attention import triton_mla
from treadle_kernels.attention import triton_mla_kernel as latent
from treadle_kernels.attention.triton_launch import H100_PROFILE, choose_launch_config, wide_head_config
from treadle_kernels.ops import (
    activation_kernels,
    cache_kernels,
    fp8_block_kernels,
    fp8_linear_kernels,
    gumbel_kernels,
    linear_kernels,
    norm_kernels,
    rotary_kernels,
    sampling_kernels,
)
from treadle_kernels.ops.support import compile_ahead as compile_one


def main() -> int:
    rotary = {"IS_NEOX": True, "Q_HEADS_BLOCK": 32, "K_HEADS_BLOCK": 8, "HALF_BLOCK": 64}
    compile_one(rotary_kernels.rotary_qk_kernel, rotary, {"positions_ptr": "*i64"})
    ints = {n: "*i32" for n in ("block_table_ptr", "seq_lens_ptr", "query_start_loc_ptr")}
    fp32 = {n: "*fp32" for n in ("part_m_ptr", "part_l_ptr", "part_acc_ptr")}
    fp8_cache = {"k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv"}  # --kv-cache-dtype fp8 (e4m3)
    for splits, block_m in ((1, 64), (16, 16), (4, 64)):
        out = {"out_ptr": "*fp32" if splits > 1 else "*bf16", **(fp8_cache if splits == 16 else {})}
        constexprs = {
            "G": 4, "HEAD_DIM": 128, "HEAD_DIM_PAD": 128, "BLOCK_SIZE": 16, "BLOCK_Q": block_m // 4,
            "BLOCK_M": block_m, "BLOCK_N": 64, "NUM_SPLITS": splits, "CAUSAL": True, "USE_WINDOW": splits == 4,
            "USE_SOFT_CAP": splits == 4, "DOT_PRECISION": "tf32", "UPCAST": False,
            "WIDE_OFFSETS": splits != 1,  # TREADLE_ATTN_NARROW_OFFSETS=1: 32-bit cache offsets
        }  # fmt: skip
        compile_one(attn.paged_attention_kernel, constexprs, {**ints, **fp32, **out}, ("scale", "soft_cap"))
    # fp8 tiles widened after their load (FP8_WIDEN)
    for widen, cache in ((1, "*fp8e4nv"), (2, "*fp8e4nv"), (2, "*fp8e5")):
        constexprs = {
            "G": 4, "HEAD_DIM": 128, "HEAD_DIM_PAD": 128, "BLOCK_SIZE": 16, "BLOCK_Q": 4, "BLOCK_M": 16,
            "BLOCK_N": 128, "NUM_SPLITS": 1, "CAUSAL": True, "USE_WINDOW": False, "USE_SOFT_CAP": False,
            "DOT_PRECISION": "tf32", "UPCAST": False, "WIDE_OFFSETS": False, "FP8_WIDEN": widen,
        }  # fmt: skip
        ptrs = {**ints, **fp32, "k_cache_ptr": cache, "v_cache_ptr": cache}
        compile_one(attn.paged_attention_kernel, constexprs, ptrs, ("scale", "soft_cap"))
    # attention sinks (gpt-oss: bf16 logits, head_dim 64, group 8, window): folded by the program, or the reduction
    for splits, block_m in ((1, 64), (16, 16)):
        out = {"out_ptr": "*fp32" if splits > 1 else "*bf16"}
        constexprs = {
            "G": 8, "HEAD_DIM": 64, "HEAD_DIM_PAD": 64, "BLOCK_SIZE": 16, "BLOCK_Q": block_m // 8,
            "BLOCK_M": block_m, "BLOCK_N": 64, "NUM_SPLITS": splits, "CAUSAL": True, "USE_WINDOW": True,
            "USE_SOFT_CAP": False, "DOT_PRECISION": "tf32", "UPCAST": False, "WIDE_OFFSETS": False,
            "HAS_SINKS": splits == 1,
        }  # fmt: skip
        compile_one(attn.paged_attention_kernel, constexprs, {**ints, **fp32, **out}, ("scale", "soft_cap"))
    # MLA (DeepSeek): one 576-wide latent head (padded to 1024) shared by 16 query heads, in the tiles
    # wide_head_config gives an H100 (a decode with 16 splits, a prefill); they must fit its 227 KB of shared memory
    for max_query_len, num_reqs in ((1, 4), (64, 2)):
        cfg = choose_launch_config(H100_PROFILE, num_reqs, max_query_len, 1, 16)
        cfg = wide_head_config(cfg, H100_PROFILE, 1024, 16, max_query_len)
        out = {"out_ptr": "*fp32" if cfg.num_splits > 1 else "*bf16"}
        constexprs = {
            "G": 16, "HEAD_DIM": 576, "HEAD_DIM_PAD": 1024, "BLOCK_SIZE": 16, "BLOCK_Q": cfg.block_q,
            "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "NUM_SPLITS": cfg.num_splits, "CAUSAL": True,
            "USE_WINDOW": False, "USE_SOFT_CAP": False, "DOT_PRECISION": "tf32", "UPCAST": False,
            "WIDE_OFFSETS": False,
        }  # fmt: skip
        kernel = compile_one(attn.paged_attention_kernel, constexprs, {**ints, **fp32, **out}, ("scale", "soft_cap"),
                             options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})  # fmt: skip
        assert kernel.metadata.shared <= 227 * 1024, (
            f"MLA launch {cfg}: {kernel.metadata.shared} B of shared memory"
        )
    # MLA's latent path (triton_mla.py): 576 = 512 + 64, 16 heads a program, the decode launch (split, bf16 and
    # fp8 caches) and the prefill launch as an H100 gets them, under Hopper's 227 KB of shared memory
    for max_query_len, num_reqs, cache in (
        (1, 4, "*bf16"),
        (1, 4, "*fp8e4nv"),
        (64, 2, "*bf16"),
        (64, 2, "*fp8e4nv"),
    ):
        cfg, heads = triton_mla.latent_config(
            H100_PROFILE, num_reqs, max_query_len, 16, None, cache != "*bf16"
        )
        ptrs = {**ints, **fp32, "cache_ptr": cache, "out_ptr": "*fp32" if cfg.num_splits > 1 else "*bf16"}
        constexprs = {
            "MAIN": 512, "TAIL": 64, "TAIL_PAD": 64, "HEADS": heads, "BLOCK_SIZE": 16, "BLOCK_Q": cfg.block_q,
            "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "NUM_SPLITS": cfg.num_splits, "CAUSAL": True,
            "DOT_PRECISION": "tf32", "UPCAST": False, "WIDE_OFFSETS": False,
        }  # fmt: skip
        kernel = compile_one(latent.latent_attention_kernel, constexprs, ptrs, ("scale",),
                             options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})  # fmt: skip
        assert kernel.metadata.shared <= 227 * 1024, f"latent launch {cfg}: {kernel.metadata.shared} B"
    constexprs = {"MAIN": 512, "TAIL": 64, "TAIL_PAD": 64, "NUM_SPLITS": 16, "FILTER": True}
    compile_one(latent.reduce_latent_splits_kernel, constexprs, {**ints, **fp32})
    for flt, sinks in ((False, False), (True, False), (True, True)):
        constexprs = {
            "HEAD_DIM": 128,
            "HEAD_DIM_PAD": 128,
            "NUM_SPLITS": 16,
            "FILTER": flt,
            "HAS_SINKS": sinks,
        }
        compile_one(attn.reduce_splits_kernel, constexprs, {**ints, **fp32})
    decode_ptrs = {**ints, **fp32, "counter_ptr": "*i32", "positions_ptr": "*i64", "slot_mapping_ptr": "*i64"}
    for splits, window, fp8, sinks in ((1, False, False, False), (16, True, False, False), (16, False, True, False),
                                       (1, True, False, True), (16, True, False, True)):  # fmt: skip
        constexprs = {
            "G": 4, "HALF": 64, "BLOCK_SIZE": 16, "BLOCK_M": 16, "BLOCK_N": 64, "NUM_SPLITS": splits,
            "USE_WINDOW": window, "DOT_PRECISION": "tf32", "UPCAST": False, "USE_PDL": splits > 1,
            "FP8_MAX": 448.0 if fp8 else 0.0, "HAS_SINKS": sinks,
        }  # fmt: skip
        ptrs = {**decode_ptrs, **(fp8_cache if fp8 else {})}
        compile_one(decode.decode_attention_kernel, constexprs, ptrs, ("scale",))
    for residual, gemma in ((False, False), (True, False), (False, True)):
        norm = {"HAS_RESIDUAL": residual, "GEMMA": gemma, "BLOCK": 4096}
        compile_one(norm_kernels.rms_norm_kernel, norm, {}, ("epsilon",))
    for gelu in (False, True):
        compile_one(activation_kernels.act_and_mul_kernel, {"GELU_TANH": gelu, "BLOCK": 1024}, {})
    for cache_type, fp8_max in (("*bf16", 0.0), ("*fp8e4nv", 448.0), ("*fp8e5", 57344.0)):
        cache = {"HEADS_BLOCK": 8, "DIM_BLOCK": 128, "FP8_MAX": fp8_max, "INTERPRETED": False}
        ptrs = {"slot_mapping_ptr": "*i64", "key_cache_ptr": cache_type, "value_cache_ptr": cache_type}
        compile_one(cache_kernels.reshape_and_cache_kernel, cache, ptrs)
    for prologue in (0, 1, 2, 3):
        for rows, block_n, block_k in ((1, 16, 512), (16, 32, 128)):
            linear = {
                "PROLOGUE": prologue, "HAS_BIAS": prologue == 0, "ROWS": rows, "BLOCK_N": block_n,
                "BLOCK_K": block_k, "DOT_PRECISION": "tf32", "UPCAST": False, "USE_PDL": prologue % 2 == 1,
            }  # fmt: skip
            compile_one(linear_kernels.small_m_linear_kernel, linear, {}, ("epsilon",))
    # --quantization fp8, or an fp8 checkpoint (STATIC: its per-tensor input scales)
    fp8 = {"weight_ptr": "*fp8e4nv", "weight_scale_ptr": "*fp32", "input_scale_ptr": "*fp32"}
    for static in (False, True):
        for rows, block_n, block_k in ((1, 8, 2048), (16, 32, 256)):
            constexprs = {
                "HAS_BIAS": rows == 1,
                "STATIC": static,
                "ROWS": rows,
                "BLOCK_N": block_n,
                "BLOCK_K": block_k,
                "UPCAST": False,
            }
            compile_one(
                fp8_linear_kernels.fp8_small_m_linear_kernel, constexprs, fp8, options={"num_warps": 4}
            )
        quant = {"q_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "given_scale_ptr": "*fp32"}
        constexprs = {"STATIC": static, "BLOCK_K": 1024, "HW_CVT": True}
        compile_one(fp8_linear_kernels.quantize_fp8_rows_kernel, constexprs, quant)
    # block-wise fp8 checkpoints (128 x 128 tiles): the one-row kernel, the GEMM with and without its own
    # activation quantization, and the group quantization kernel
    block = {"weight_ptr": "*fp8e4nv", "weight_scale_ptr": "*fp32", "bias_ptr": "*bf16"}
    gemv = {"HAS_BIAS": True, "BLOCK_N": 8, "GROUPS": 16, "GROUP_PAD": 128, "HW_CVT": True}
    compile_one(fp8_block_kernels.fp8_block_gemv_kernel, gemv, block, options={"num_warps": 4})
    for quant_a, block_m, block_n, warps, stages in ((True, 16, 32, 4, 4), (True, 64, 128, 4, 4),
                                                     (False, 128, 128, 8, 3)):  # fmt: skip
        ptrs = {**block, "a_ptr": "*bf16" if quant_a else "*fp8e4nv", "a_scale_ptr": "*fp32"}
        constexprs = {
            "QUANT_A": quant_a, "HAS_BIAS": not quant_a, "EXACT_K": not quant_a, "BLOCK_M": block_m,
            "BLOCK_N": block_n, "BLOCK_K": 128, "GROUP_M": 8, "HW_CVT": True, "UPCAST": False,
        }  # fmt: skip
        options = {"num_warps": warps, "num_stages": stages}
        # aligned as torch's allocations are on the device: the K loop's loads are then pipelined (cp.async)
        aligned = ("a_ptr", "weight_ptr", "out_ptr", "a_row_stride", "out_row_stride", "k")
        compile_one(fp8_block_kernels.fp8_block_gemm_kernel, constexprs, ptrs, divisible_by_16=aligned,
                    options=options)  # fmt: skip
    groups = {"q_ptr": "*fp8e4nv", "scale_ptr": "*fp32"}
    constexprs = {"GROUPS": 8, "GROUP_PAD": 128, "HW_CVT": True}
    compile_one(fp8_block_kernels.quantize_fp8_groups_kernel, constexprs, groups)
    partials = {"part_key_ptr": "*i32", "part_index_ptr": "*i32"}
    for logits in ("*fp32", "*bf16", "*fp16"):
        for chunk in (16, 1024):
            compile_one(
                sampling_kernels.argmax_chunks_kernel, {"CHUNK": chunk}, {"logits_ptr": logits, **partials}
            )
    for chunks_block in (1, 128, 1024):
        reduce = {"CHUNKS_BLOCK": chunks_block}
        compile_one(sampling_kernels.argmax_reduce_kernel, reduce, {**partials, "out_ptr": "*i64"})
    gumbel = {"temperature_ptr": "*fp32", "keys_ptr": "*i64", **partials}
    for logits in ("*fp32", "*bf16"):
        compile_one(
            gumbel_kernels.gumbel_argmax_chunks_kernel, {"CHUNK": 1024}, {"logits_ptr": logits, **gumbel}
        )
    print("compiled for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
