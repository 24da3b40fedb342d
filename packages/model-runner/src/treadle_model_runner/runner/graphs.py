"""The runner's CUDA graphs: which are wanted, the dummy batches they capture, and their capture at start-up.

These sets, all over the runner's persistent step buffers and KV cache (so a replay reads the step's inputs where
the capture read the dummy ones):
  decode      `runner.graphs`: whole forwards of N one-token requests at the capture sizes (cuda_graph.py)
  piecewise   `runner.piecewise`: any other step of up to TREADLE_PIECEWISE_MAX_TOKENS tokens, the pieces between
              the attention calls captured and attention run eagerly (piecewise.py); not captured when the
              mixed graphs below take those steps
  prefill     `runner.prefill_graphs`: one request's prefill at the piecewise token buckets, whole, where the
              attention backend can build its metadata on the device (prefill_graphs.py)
  verify      `runner.verify_graphs`: under speculative decoding, whole forwards of N requests of at most 1 + k
              tokens each (verifying drafts), where the backend allows it (batch_graphs.py)
  mixed       `runner.mixed_graphs`: whole forwards of any other step of several requests at the piecewise token
              buckets, where the backend allows it (batch_graphs.py)
A step takes the first that fits: decode; verify; prefill (one request); mixed; piecewise; else it runs eagerly.
Graphs are wanted on CUDA unless `enforce_eager`, and only with a backend that supports them. A capture that fails
leaves that set empty (None on the runner): those steps run eagerly. The memory probe (graph_memory.py) captures a
few of the same forwards before the KV cache is sized. With LoRA enabled each set is captured in two variants, with
and without the adapters' path, and replays the one the step needs (lora_graphs.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from treadle_model_runner import envs
from treadle_model_runner.forward_context import ForwardContext, set_forward_context
from treadle_model_runner.runner.batch_graphs import BatchGraphs, GraphPlan, capture_batch_graphs
from treadle_model_runner.runner.cuda_graph import CudaGraphRunner, GraphSet, capture_sizes
from treadle_model_runner.runner.inputs import StepInputs, prepare_inputs
from treadle_model_runner.runner.lora_graphs import as_one_set, capture_set
from treadle_model_runner.runner.piecewise import PiecewiseGraphs, piecewise_forward, token_buckets
from treadle_model_runner.runner.prefill_graphs import capture_metadata

if TYPE_CHECKING:
    from treadle_model_runner.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def graphs_wanted(runner: ModelRunner) -> bool:
    return (
        runner.device.type == "cuda"
        and not runner.model_config.enforce_eager
        and bool(runner.attn_backend.supports_cuda_graphs)
    )


def prefill_graphs_wanted(runner: ModelRunner) -> bool:
    return bool(runner.attn_backend.supports_prefill_graphs) and envs.TREADLE_PREFILL_GRAPHS()


def piecewise_sizes(runner: ModelRunner) -> list[int]:
    """Token buckets of the piecewise CUDA graphs (TREADLE_PIECEWISE_MAX_TOKENS, within the step budget)."""
    return token_buckets(runner.max_num_batched_tokens)


def capture_graphs(runner: ModelRunner) -> None:
    """Capture the decode, one-request prefill, verify and mixed graphs, and the piecewise graphs where no mixed
    graphs are (when wanted), and set them on the runner."""
    if not graphs_wanted(runner):
        if runner.device.type == "cuda" and not runner.model_config.enforce_eager:
            logger.info(
                "CUDA graphs off: attention backend %r launches from host metadata", runner.attn_backend.name
            )
        return
    mask = runner.lora.mask if runner.lora is not None else None
    decode = capture_set(
        mask, lambda kind: CudaGraphRunner(capture_sizes(runner.max_num_seqs), "decode batch" + kind),
        lambda g, pool: g.capture(lambda size: prepare_decode_capture(runner, size), pool),
    )  # fmt: skip
    runner.graphs = as_one_set(decode, mask)  # capture failed: run eagerly, no padding
    buckets = piecewise_sizes(runner)
    batch = capture_batch_graphs(runner, mask)  # verify and mixed graphs
    pieces = capture_set(
        mask, lambda kind: PiecewiseGraphs(buckets, kind),
        lambda g, pool: g.capture(lambda size, split: prepare_piecewise_capture(runner, size, split), pool),
    ) if buckets and runner.mixed_graphs is None else []  # fmt: skip
    runner.piecewise = as_one_set(pieces, mask)
    prefill = capture_set(
        mask, lambda kind: CudaGraphRunner(buckets, "one-request prefill" + kind),
        lambda g, pool: g.capture(lambda size: prepare_prefill_capture(runner, size), pool),
    ) if buckets and prefill_graphs_wanted(runner) else []  # fmt: skip
    runner.prefill_graphs = as_one_set(prefill, mask)
    if runner.drafter is not None:  # its graphs over the same buffers (no LoRA with a draft model)
        runner.drafter.capture(runner, buckets, prefill_graphs_wanted(runner))
    reserved = runner.graph_bytes_reserved
    captured: list[GraphSet] = [*decode, *pieces, *prefill, *batch]
    taken = sum(g.memory_bytes for g in captured)
    taken += runner.drafter.memory_bytes if runner.drafter is not None else 0
    if decode and reserved and taken > 1.2 * reserved + (64 << 20):
        logger.warning("CUDA graphs took %.0f MiB, more than the %.0f MiB left for them before the KV cache "
                       "was sized; lower --gpu-memory-utilization if memory runs out",
                       taken / (1 << 20), reserved / (1 << 20))  # fmt: skip


def batch_plan(
    num_scheduled: np.ndarray,
    prefill: GraphSet | None,
    verify: BatchGraphs | None,
    mixed: BatchGraphs | None,
) -> tuple[BatchGraphs, GraphPlan] | None:
    """The verify or mixed graph a step that is not decode-only replays, and how it pads (batch_graphs.py): verify
    graphs first; a one-request step that the prefill graphs take is theirs, not the mixed graphs'."""
    if verify is not None and (plan := verify.plan(num_scheduled)) is not None:
        return verify, plan
    if mixed is None:
        return None
    if len(num_scheduled) == 1 and prefill is not None and prefill.padded_size(int(num_scheduled.sum())):
        return None
    plan = mixed.plan(num_scheduled)
    return (mixed, plan) if plan is not None else None


def padded_size(
    num_scheduled: np.ndarray,
    decode: GraphSet | None,
    prefill: GraphSet | None,
    piecewise: GraphSet | None,
    verify: BatchGraphs | None = None,
    mixed: BatchGraphs | None = None,
) -> int | None:
    """The token count a step of `num_scheduled` tokens per request pads to for the graph `forward_step` will
    replay (a decode-only step: the decode graphs' request count; a verify or mixed graph's rows, `batch_plan`;
    one request: the prefill graphs' bucket; else the piecewise bucket), or None when no graph takes it."""
    if (num_scheduled == 1).all():
        return decode.padded_size(len(num_scheduled)) if decode is not None else None
    if (chosen := batch_plan(num_scheduled, prefill, verify, mixed)) is not None:
        return chosen[1].tokens
    buckets = prefill if len(num_scheduled) == 1 and prefill is not None else piecewise
    return buckets.padded_size(int(num_scheduled.sum())) if buckets is not None else None


def forward_step(
    runner: ModelRunner,
    inputs: StepInputs,
    model: torch.nn.Module,
    decode: GraphSet | None,
    prefill: GraphSet | None,
    piecewise: GraphSet | None,
    verify: BatchGraphs | None = None,
    mixed: BatchGraphs | None = None,
) -> torch.Tensor:
    """`model` over a step's inputs (the runner's model or a draft model, with that model's graph sets), the way
    the step's shape allows: a decode graph (decode-only), a verify or mixed graph, a one-request prefill graph,
    piecewise graphs around eager attention, or eagerly; as `padded_size` chose. Returns the hidden states
    [padded tokens, hidden]."""
    size = inputs.num_padded_tokens
    if decode is not None and inputs.is_decode_only and decode.has(size):
        for builder, common in zip(runner.builders, inputs.attn_metadata, strict=True):
            builder.prepare_cuda_graph_replay(common, size)
        return decode.replay(size)
    if (chosen := batch_plan(inputs.num_scheduled, prefill, verify, mixed)) is not None:
        return chosen[0].graphs.replay(chosen[1].size)
    if prefill is not None and inputs.num_reqs == 1 and not inputs.is_decode_only and prefill.has(size):
        return prefill.replay(size)
    with set_forward_context(runner.forward_context(inputs)):
        if piecewise is not None and not inputs.is_decode_only and piecewise.has(size):
            return piecewise.replay(size)
        return model(inputs.input_ids, inputs.positions)


def prepare_decode_capture(
    runner: ModelRunner, size: int, model: torch.nn.Module | None = None
) -> Callable[[], torch.Tensor]:
    """A dummy decode batch of `size` one-token requests over the null block, and the forward of `model` (default:
    the runner's; a draft model's, runner/draft_model.py)."""
    inputs = prepare_inputs(runner.batch, np.zeros(0, dtype=np.int64), runner.buffers, size)
    context = runner.forward_context(inputs, graph_size=size)
    model = model if model is not None else runner._require_model()

    def forward() -> torch.Tensor:
        with set_forward_context(context):
            return model(inputs.input_ids, inputs.positions)

    return forward


def prepare_prefill_capture(
    runner: ModelRunner, size: int, model: torch.nn.Module | None = None
) -> Callable[[], torch.Tensor]:
    """One request of `size` tokens over the step buffers (holding a harmless batch), and the forward of `model`
    (default: the runner's; a draft model's)."""
    metadata = capture_metadata(runner.batch, runner.buffers, size)
    built = [b.build(m) for b, m in zip(runner.builders, metadata, strict=True)]
    context = ForwardContext(runner.kv_caches, [built[g] for g in runner.layer_to_group], size)
    model = model if model is not None else runner._require_model()
    input_ids, positions = runner.buffers.input_ids[:size], runner.buffers.positions[:size]

    def forward() -> torch.Tensor:
        with set_forward_context(context):
            return model(input_ids, positions)

    return forward


def prepare_piecewise_capture(runner: ModelRunner, size: int, split: Any) -> Callable[[], torch.Tensor]:
    """The forward of `size` tokens over the input buffers, each attention call taken by `split`."""
    buffers = runner.buffers
    return piecewise_forward(runner._require_model(), runner.kv_caches, buffers.input_ids[:size],
                             buffers.positions[:size], split)  # fmt: skip
