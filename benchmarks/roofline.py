"""Rooflines from a model's config.json and the device ceilings measured in the same run.

Bytes and FLOPs come from the shapes alone (bf16: 2 bytes a weight):
  decode latency   one batch-1 decode step reads every weight it uses once: the layers' attention and dense
                   MLP, for an MoE model the router plus the top-k experts of each layer, the final norm and the
                   lm_head (not the embedding table: one row is gathered) -> roofline ms = bytes / copy rate.
  throughput       offline N x (in / out): prefill is compute-bound (2 FLOPs per active weight per prompt
                   token at the bf16 matmul rate), each decode step at concurrency B is memory-bound: the weights
                   the B tokens touch (an MoE layer's experts: E (1 - (1 - k/E)^B) in expectation) plus the KV
                   cache of B sequences at their mean length (in + out / 2). B = min(max_num_seqs, KV capacity /
                   (in + out)). Roofline tok/s = N out / (prefill time + decode time).
  serial bound     the same, but a decode step's GEMMs take max(weight bytes / copy rate, 2 B active FLOPs /
                   matmul rate) and attention's KV reads come after them (nothing overlaps the two): at B = 256
                   an 8B model's GEMMs are compute-bound, so this bounds an engine that runs a step's kernels
                   one after another, as treadle and vLLM do.
The copy rate counts bytes read plus written, which is how a step's reads stream through HBM in practice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Shapes:
    """Weight counts (elements) of one model, split the way a decode step touches them."""

    dense_per_layer: int  # attention (+ dense MLP, router, norms) of one layer
    expert: int  # one expert's w13 + w2 (0 for a dense model)
    num_experts: int
    top_k: int
    layers: int
    lm_head: int  # lm_head (+ final norm)
    kv_bytes_per_token: int  # K and V of every layer, in the model dtype

    def decode_weights(self, batch: int = 1) -> float:
        """Weight elements a decode step at `batch` tokens reads (expected distinct experts for MoE)."""
        touched = 0.0
        if self.num_experts:
            touched = self.num_experts * (1.0 - (1.0 - self.top_k / self.num_experts) ** batch)
        return self.layers * (self.dense_per_layer + touched * self.expert) + self.lm_head

    @property
    def active_per_token(self) -> int:
        return self.layers * (self.dense_per_layer + self.top_k * self.expert) + self.lm_head


def shapes(model_dir: Path, dtype_bytes: int = 2, kv_dtype_bytes: int | None = None) -> Shapes:
    """``kv_dtype_bytes``: bytes of one cached K or V value (default the model's; 1 for an fp8 cache)."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    h, heads = c["hidden_size"], c["num_attention_heads"]
    kv = c.get("num_key_value_heads", heads)
    hd = c.get("head_dim") or h // heads
    attn = h * heads * hd * 2 + h * kv * hd * 2 + (2 * hd if c["model_type"].startswith("qwen3") else 0)
    experts = int(c.get("num_experts") or c.get("num_local_experts") or 0)
    if experts:
        inter = c.get("moe_intermediate_size") or c["intermediate_size"]
        dense, expert = attn + h * experts + 2 * h, 3 * h * inter
    else:
        dense, expert = attn + 3 * h * c["intermediate_size"] + 2 * h, 0
    return Shapes(
        dense_per_layer=dense,
        expert=expert,
        num_experts=experts,
        top_k=int(c.get("num_experts_per_tok") or 0),
        layers=c["num_hidden_layers"],
        lm_head=c["vocab_size"] * h + h,
        kv_bytes_per_token=2 * c["num_hidden_layers"] * kv * hd * (kv_dtype_bytes or dtype_bytes),
    )


def latency_roofline_ms(s: Shapes, copy_gbps: float, dtype_bytes: int = 2) -> float:
    return s.decode_weights(1) * dtype_bytes / (copy_gbps * 1e9) * 1e3


def throughput_roofline(
    s: Shapes,
    copy_gbps: float,
    matmul_tflops: float,
    num_prompts: int,
    input_len: int,
    output_len: int,
    kv_capacity_tokens: int,
    max_num_seqs: int = 256,
    dtype_bytes: int = 2,
) -> dict[str, float]:
    batch = max(1, min(max_num_seqs, num_prompts, kv_capacity_tokens // (input_len + output_len)))
    prefill_s = 2.0 * s.active_per_token * num_prompts * input_len / (matmul_tflops * 1e12)
    step_bytes = (
        s.decode_weights(batch) * dtype_bytes + batch * (input_len + output_len / 2) * s.kv_bytes_per_token
    )
    steps = num_prompts * output_len / batch
    decode_s = steps * step_bytes / (copy_gbps * 1e9)
    # serial: a step's GEMMs take max(weight bytes, their FLOPs at the matmul rate), then attention reads the KV
    weights_s = s.decode_weights(batch) * dtype_bytes / (copy_gbps * 1e9)
    gemm_s = max(weights_s, 2.0 * s.active_per_token * batch / (matmul_tflops * 1e12))
    kv_s = batch * (input_len + output_len / 2) * s.kv_bytes_per_token / (copy_gbps * 1e9)
    serial_decode_s = steps * (gemm_s + kv_s)
    return {
        "roofline_output_tok_s": num_prompts * output_len / (prefill_s + decode_s),
        "roofline_concurrency": batch,
        "roofline_prefill_s": prefill_s,
        "roofline_decode_s": decode_s,
        "serial_bound_output_tok_s": num_prompts * output_len / (prefill_s + serial_decode_s),
        "serial_bound_decode_s": serial_decode_s,
    }
