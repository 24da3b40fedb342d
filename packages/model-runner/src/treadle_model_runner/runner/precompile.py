"""Compile the attention kernels' variants side by side at start-up, before the passes that launch them.

The start-up passes (profiling, the graph-memory probe, warm-up, CUDA-graph capture) compile each Triton variant
the first time they launch it, one after another. Here, before the profiling pass, every attention layer kind
walks the batch shapes those passes will run, under `compile_only` (treadle_kernels/ops/launch.py): the rotary,
KV-write and attention launches do not run, their variants compile on a thread pool, and the passes find them
compiled, or wait for the one still compiling. The shapes: the profiling pass, each decode capture size, the
one-request prefill sizes and the warm-up shapes; each launch picks its variant from these host integers only, so
the variants are the passes' own. The tensors are fresh, in the shapes and strides the model hands its attention
layers (q, k and v are views of one qkv row); nothing the engine holds is written. `TREADLE_COMPILE_AHEAD=0` turns
it off.

Measured on an H200 with dummy Llama-3.1-8B weights, kernel caches removed, alternating with the tree before on
one machine: 13 variant groups compile on 15 threads in 4.3-5.0 s while the profiling pass runs, and `treadle
serve` is ready 19.5-23.3 s after its start against 26.1-28.8 s (benchmarks/results/gpu-compile-ahead-h200-529f98c).
Walking the rest of the model too (norms, SiLU, the small-batch linear: about 2 s of compiles left in the main
thread) measured no faster there (calls 5 and 6): their compiles then contend with the profiling pass.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import TYPE_CHECKING, Any

import torch

from treadle_kernels.attention import AttentionMetadata
from treadle_kernels.ops.launch import compile_only, compiles_finished
from treadle_model_runner import envs
from treadle_model_runner.forward_context import ForwardContext, set_forward_context
from treadle_model_runner.kv_cache import allocate_kv_caches
from treadle_model_runner.layers.rotary import RotaryEmbedding
from treadle_model_runner.runner.cuda_graph import capture_sizes
from treadle_model_runner.runner.graphs import piecewise_sizes
from treadle_model_runner.runner.profile import profile_lengths
from treadle_model_runner.runner.warmup import SHAPES, fits

if TYPE_CHECKING:
    from treadle_model_runner.layers.attention import Attention
    from treadle_model_runner.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

Shape = tuple[tuple[int, ...], tuple[int, ...]]  # (query lengths, context lengths before the step)


class CompileAhead:
    """The compiles submitted at start-up: `wait` for them (before any CUDA-graph capture, so no other thread
    touches the device then), `report` how many there were, which failed, and when the last one finished."""

    def __init__(self, futures: list[Future[Any]], started: float, threads: int) -> None:
        self.futures, self.started, self.threads = futures, started, threads
        self._lock = threading.Lock()
        self._last_done = started
        for f in futures:
            f.add_done_callback(self._done)

    def _done(self, _future: Future[Any]) -> None:
        with self._lock:
            self._last_done = max(self._last_done, time.perf_counter())

    def wait(self) -> None:
        futures_wait(self.futures)
        compiles_finished()

    def report(self) -> None:
        self.wait()
        failed = [e for f in self.futures if (e := f.exception()) is not None]
        note = f"; {len(failed)} failed (compiled at first launch instead): {failed[0]!r}" if failed else ""
        logger.info("compile-ahead: %d attention kernel variant groups on %d threads, all done %.1f s after the "
                    "start%s", len(self.futures), self.threads, self._last_done - self.started, note)  # fmt: skip


def start_compile_ahead(runner: ModelRunner) -> CompileAhead | None:
    """Submit the attention variants' compiles (GPU, a backend that supports it); None when nothing was sent."""
    if runner.device.type != "cuda" or not getattr(runner.attn_backend, "compiles_ahead", False):
        return None
    if not envs.TREADLE_COMPILE_AHEAD():
        return None
    started = time.perf_counter()
    threads = max(1, min(16, (os.cpu_count() or 2) - 1))
    pool = compile_pool(runner.device, threads)
    futures: list[Future[Any]] = []
    try:
        with torch.inference_mode(), compile_only(pool) as futures:
            shapes = _shapes(runner)
            for layer in _layer_kinds(runner.kv_layers()):
                inputs = attention_inputs(runner, layer)
                for shape in shapes:
                    _attend(runner, layer, shape, *inputs)
    except Exception:  # an optimisation only: the passes compile whatever is missing
        logger.exception("compile-ahead stopped; the start-up passes compile the remaining kernels")
    finally:
        pool.shutdown(wait=False)
    return CompileAhead(futures, started, threads) if futures else None


def compile_pool(device: torch.device, threads: int) -> ThreadPoolExecutor:
    """Threads whose current CUDA device is `device` (Triton compiles for the current device), by its index:
    a bare "cuda" is the process's current device (set_device refuses an index-less device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return ThreadPoolExecutor(threads, thread_name_prefix="treadle-compile", initializer=torch.cuda.set_device,
                              initargs=(index,))  # fmt: skip


def _layer_kinds(layers: list[Attention]) -> list[Attention]:
    """One layer of each kind whose launches differ (heads, head size, sliding window, soft cap, attention sinks:
    gpt-oss's layers compile their HAS_SINKS variants, and its sliding and full layers differ)."""
    kinds: dict[tuple[Any, ...], Attention] = {}
    for a in layers:
        key = (a.num_heads, a.num_kv_heads, a.head_size, a.sliding_window is None, a.logits_soft_cap is None,
               a.sinks is None)  # fmt: skip
        kinds.setdefault(key, a)
    return list(kinds.values())


def _shapes(runner: ModelRunner) -> list[Shape]:
    """The batch shapes the start-up passes run: decode captures, profiling, one-request prefills, warm-up."""
    lengths = profile_lengths(runner)
    shapes: list[Shape] = [(tuple(lengths), (0,) * len(lengths))]  # profile.py's pass, the first to run
    shapes += [((1,) * n, (1,) * n) for n in capture_sizes(runner.max_num_seqs)]
    shapes += [((n,), (0,)) for n in piecewise_sizes(runner)]
    shapes += [s for s in SHAPES if fits(runner, *s)]
    return shapes


def attention_inputs(runner: ModelRunner, layer: Attention) -> tuple[torch.Tensor, RotaryEmbedding | None]:
    """What every walk of `layer` shares: a KV cache of two blocks in its shape, and the model's rotary embedding."""
    kv_cache = allocate_kv_caches([layer], 2, runner.cache_config.block_size, runner.kv_cache_dtype, runner.device,
                                  runner.attn_backend)[0]  # fmt: skip
    rotary = next((m for m in runner._require_model().modules() if isinstance(m, RotaryEmbedding)), None)
    # MLA rotates its rope dims itself (models/deepseek_mla.py): its attention gets no rope
    if layer.shares_kv:
        rotary = None
    return kv_cache, rotary


def _attend(
    runner: ModelRunner,
    layer: Attention,
    shape: Shape,
    kv_cache: torch.Tensor,
    rotary: RotaryEmbedding | None,
) -> None:
    """One attention call of `layer` over `shape`, as the model makes it, under compile_only."""
    queries, contexts = shape
    n, tokens = len(queries), sum(queries)
    device, group = runner.device, runner.layer_to_group[layer.layer_idx]
    seq_lens = torch.tensor([q + c for q, c in zip(queries, contexts, strict=True)], dtype=torch.int32)
    qsl = torch.zeros(n + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(queries, dtype=torch.int32).cumsum(0)
    common = AttentionMetadata(
        num_actual_tokens=tokens,
        max_query_len=max(queries),
        max_seq_len=int(seq_lens.max()),
        query_start_loc=qsl.to(device),
        query_start_loc_cpu=qsl,
        seq_lens=seq_lens.to(device),
        seq_lens_cpu=seq_lens,
        block_table=runner.batch.block_tables[group].device_table[:n],
        slot_mapping=torch.zeros(tokens, dtype=torch.int64, device=device),
    )
    metadata = runner.builders[group].build(common)
    if hasattr(metadata, "xqa_workspace"):
        metadata.xqa_workspace = None  # FlashInfer's XQA kernel is not Triton: it would run
    q_size, kv_size = layer.num_heads * layer.head_size, layer.num_kv_heads * layer.head_size
    qkv = torch.empty(tokens, q_size + 2 * kv_size, dtype=runner.dtype, device=device)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    rope = rotary.rope(torch.zeros(tokens, dtype=torch.int64, device=device)) if rotary is not None else None
    caches: list[Any] = [None] * (layer.layer_idx + 1)
    caches[layer.layer_idx] = kv_cache
    context = ForwardContext(caches, [metadata] * (layer.layer_idx + 1), tokens)
    with set_forward_context(context):
        layer.attend(q, k, v, rope, torch.empty_like(q))
