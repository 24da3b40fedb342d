"""Phi-3 / Phi-3.5-mini / Phi-4-mini (`Phi3ForCausalLM`): the Llama decoder with three differences, all outside the
decoder's arithmetic.

- The checkpoint stores `qkv_proj` (rows q, then k, then v) and `gate_up_proj` (gate rows, then up rows) already
  stacked, in the order of our stacked layers, so each loads whole (`CausalLM.load_weights`); under tensor
  parallelism every rank keeps its rows of each shard as for a split checkpoint.
- Rotary: "longrope" scaling (short or long factors and an attention factor; see layers/rotary.py for which of
  the two a server uses) and `partial_rotary_factor` (Phi-4-mini: 0.75, the first 96 of 128 head dims rotate).
  Partial rotary runs on every attention backend: the Triton fused decode kernel takes only whole-head rotary and
  leaves partial tables to the rotary op + its unified kernel (`triton_decode.fusable`); FlashInfer and XQA attend
  on q and k rotated by the rotary op before them (`AttentionImpl.forward_rope`).
- Sliding window over every layer when the config sets `sliding_window` (Phi-3-mini-4k: 2047), as transformers does.
"""

from __future__ import annotations

from typing import ClassVar

from treadle_model_runner.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    # no per-projection names to stack: qkv_proj and gate_up_proj arrive stacked
    stacked_params: ClassVar[tuple[tuple[str, str, str], ...]] = ()
