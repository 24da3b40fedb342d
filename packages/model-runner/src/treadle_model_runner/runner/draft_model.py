"""Draft-model speculative decoding in the runner (speculative_config method draft_model, as vLLM's).

A smaller model sharing the target's tokenizer proposes each request's next k tokens greedily; the scheduler sends
them back with the next step, which verifies them (spec_decode.py). Drafts only decide how many tokens a step
may keep, never which: the output equals decoding without speculation whatever the draft model says.

Its KV cache. The draft model's attention layers are numbered after the target's (layer_idx + the target's layer
count) and join the same paged pool: same blocks, same block tables, same slot mapping, each layer with its own
tensor. After each step the draft's KV must hold every position the target's does, for the same tokens:
  - pass j = 1..k (only for rows that sampled): one token per drafting request, at position N - 2 + j where N is
    its token count after this step's tokens were appended: the last sampled token (j = 1), then draft j - 1;
    its greedy next token is draft j. These write up to k slots past the step's tokens: the scheduler allocates
    that lookahead when the pool has room (scheduler._allocate). Draft j needs its slot allocated: a request
    gets at most (its slots - N + 1) drafts.
  - pass 0 (every step, before them): the step's positions the draft has no KV for. RequestState.draft_kv_end
    records how far its KV is right: the next step schedules the last sample and the drafts the scheduler kept,
    whose positions passes 1..k already wrote with those very tokens, all but the last draft's. So on decode
    and verification steps pass 0 is one token a row (its last scheduled position; a row with nothing missing
    writes that position again, the same KV), and a prefill chunk runs whole. Rejected drafts' positions hold
    stale KV past draft_kv_end, rewritten before anything reads them, as the target's.
A request that does not draft this step (a prefill chunk, one near max_tokens) runs its last position of the
step again in passes 1..k (the same token and position: the same KV written), so every pass is one token per
batch row and the batch's block tables serve it unchanged.

On a GPU the draft model has CUDA graphs of its own, captured after the target's over the same step buffers
(`capture`); passes 0..k take them as the target's steps take its graphs (graphs.forward_step): one token a row
replays a decode graph, a one-request prefill a prefill graph, other steps piecewise graphs. Drafts go back in
ModelRunnerOutput's `draft_token_ids`; the scheduler offers them only while the request's token count is the one
they follow.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from treadle_model_runner.config import SpeculativeConfig
from treadle_model_runner.layers.attention import Attention
from treadle_model_runner.loader import resolve_model
from treadle_model_runner.loader.weights import CONFIG_FILE
from treadle_model_runner.models import get_model_class
from treadle_model_runner.outputs import ModelRunnerOutput
from treadle_model_runner.quantization import resolve_quantization
from treadle_model_runner.runner.build import build_causal_lm
from treadle_model_runner.runner.cuda_graph import CudaGraphRunner, capture_sizes
from treadle_model_runner.runner.device_inputs import move_decode_positions
from treadle_model_runner.runner.graphs import (
    forward_step,
    padded_size,
    prepare_decode_capture,
    prepare_prefill_capture,
)
from treadle_model_runner.runner.inputs import StepInputs, prepare_inputs
from treadle_model_runner.runner.piecewise import PiecewiseGraphs, piecewise_forward
from treadle_model_runner.runner.setup import resolve_max_model_len

if TYPE_CHECKING:
    from treadle_model_runner.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# a draft's and its target's vocabulary sizes may differ by this much: the same tokenizer, embeddings padded to
# other multiples (Qwen2's 1.5B has 151,936 rows, its 72B 152,064); more means another tokenizer
MAX_VOCAB_PADDING = 128


class _Passes(NamedTuple):
    """The draft passes of one step, planned on the host and uploaded: rows that draft, drafts each may get, and
    every row's position in each pass ([passes, R])."""

    rows: np.ndarray
    caps: np.ndarray
    positions: np.ndarray
    device_positions: torch.Tensor
    device_rows: torch.Tensor
    device_caps: torch.Tensor


class DraftModel:
    def __init__(self, runner: ModelRunner, config: SpeculativeConfig) -> None:
        """Load the draft model of `config` on the runner's device, in its dtype, its attention layers numbered
        after the target's (call after the target is loaded)."""
        assert config.model is not None
        target = runner._require_model()
        draft_config = dataclasses.replace(
            runner.model_config, model=config.model, tokenizer=None, quantization=None,
            load_format="dummy" if runner.model_config.load_format == "dummy" else "auto",
            max_model_len=runner.max_model_len, served_model_name=None,
        )  # fmt: skip
        resolved = resolve_model(draft_config)
        try:
            resolve_max_model_len(runner.max_model_len, resolved.hf_config)
        except ValueError as exc:
            raise ValueError(f"speculative_config model {config.model!r}: {exc}") from None
        draft_vocab = int(resolved.hf_config.vocab_size)
        if abs(draft_vocab - runner.vocab_size) > MAX_VOCAB_PADDING:
            raise ValueError(
                f"speculative_config model {config.model!r} has a vocabulary of {draft_vocab} tokens and the target "
                f"{runner.vocab_size}: a draft model must share the target's tokenizer (sizes may differ by at "
                f"most {MAX_VOCAB_PADDING}, the embedding padding of one model family's sizes)"
            )
        plan = resolve_quantization(
            None, resolved.hf_config, get_model_class(resolved.hf_config), resolved.path / CONFIG_FILE,
            resolved.format,
        )  # fmt: skip
        self.model = build_causal_lm(
            resolved, plan, runner.dtype, runner.device, runner.max_model_len, runner.model_config.seed,
            runner.model_config.enable_expert_parallel,
        )  # fmt: skip
        self.num_speculative_tokens = config.num_speculative_tokens
        self.graphs: CudaGraphRunner | None = None  # decode graphs (passes 1..k; pass 0 after a decode step)
        self.piecewise: PiecewiseGraphs | None = None  # pass 0 after other steps
        self.prefill_graphs: CudaGraphRunner | None = None  # pass 0 after one request's multi-token step
        # drafts are target token ids: a larger draft vocabulary's extra ids are never proposed
        self.vocab_size = min(draft_vocab, runner.vocab_size)
        offset = len(target.attention_layers())
        self.layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        for layer in self.layers:
            layer.layer_idx += offset
            layer.bind_backend(runner.attn_backend)
        logger.info(
            "speculative decoding: draft model %s (%s, %d layers, %s) proposes up to %d tokens a step",
            resolved.path, type(self.model).__name__, len(self.layers), resolved.format,
            self.num_speculative_tokens,
        )  # fmt: skip

    @torch.inference_mode()
    def propose(self, runner: ModelRunner, inputs: StepInputs, output: ModelRunnerOutput) -> None:
        """Pass 0 over the step's positions the draft has no KV for yet, then passes 1..k for the rows that
        sampled; fills output.draft_token_ids. The host prepares the passes before they are queued (the device
        is idle then: the step's tokens just reached the host); passes 2..k then run back to back on the
        device, each moving the positions and feeding the draft before without the host."""
        batch = runner.batch
        num_reqs = inputs.num_reqs
        # each row's positions after this step's tokens (the draft's KV is valid below it once pass 0 ran)
        step_end = batch.num_computed_tokens[:num_reqs] + inputs.num_scheduled
        rows, caps = self._drafting_rows(runner, inputs, output)
        # the passes' positions go to the device first, while it is idle (a copy from pageable memory waits)
        passes = self._plan(runner, rows, caps, step_end - 1) if rows.size else None
        self._pass_zero(runner, inputs, step_end)
        if passes is not None:
            self._draft(runner, output, passes)
        # what the next step's pass 0 may skip: positions below the new tokens, and the drafts' positions
        ends = np.minimum(step_end, batch.num_tokens[:num_reqs] - 1)
        ends[rows] = batch.num_tokens[rows] - 1 + caps
        for row, end in enumerate(ends.tolist()):
            state = batch.states[row]
            assert state is not None
            state.draft_kv_end = end

    def _pass_zero(self, runner: ModelRunner, inputs: StepInputs, step_end: np.ndarray) -> None:
        """The draft over the step's positions it has no KV for. A decode or verification step's have mostly
        been written by the last step's passes 1..k (the same tokens: its last sample and the drafts the
        scheduler kept), leaving none or the last draft's position: then pass 0 is one token a row (a row with
        none runs its last position again) and replays a decode graph. Otherwise (prefill chunks) it runs over
        the step's own inputs."""
        batch = runner.batch
        num_reqs = inputs.num_reqs
        computed = batch.num_computed_tokens[:num_reqs]
        known = np.array([s.draft_kv_end for s in batch.states[:num_reqs] if s is not None], dtype=np.int64)
        needed = np.maximum(step_end - np.clip(known, computed, step_end), 1)
        if (needed == inputs.num_scheduled).all():
            self._forward(runner, inputs)
            return
        runner.buffers.wait_for_copies()
        step = prepare_inputs(batch, needed, runner.buffers, self._padded(needed), computed=step_end - needed)
        self._forward(runner, step)

    def _plan(self, runner: ModelRunner, rows: np.ndarray, caps: np.ndarray, last: np.ndarray) -> _Passes:
        """Passes 1..k for `rows` (at most `caps` drafts each); `last`: each row's last position this step, which a
        row that does not draft runs again."""
        num_passes = int(caps.max())
        # drafting rows: their last sampled token's position
        first = runner.batch.num_tokens[rows].astype(np.int64) - 1
        # [passes, R] each row's position in each pass: a drafting row moves on from `first` and repeats its last
        # pass once past its cap; any other row runs its last position of the step again (the same KV written)
        positions = np.repeat(last[None, :], num_passes, axis=0)
        positions[:, rows] = first[None, :] + np.minimum(np.arange(num_passes)[:, None], caps[None, :] - 1)
        device = runner.device
        return _Passes(
            rows, caps, positions, torch.from_numpy(positions).to(device), torch.from_numpy(rows).to(device),
            torch.from_numpy(caps).to(device),
        )  # fmt: skip

    def _draft(self, runner: ModelRunner, output: ModelRunnerOutput, passes: _Passes) -> None:
        """Passes 1..k: greedy drafts into output.draft_token_ids."""
        batch = runner.batch
        rows, caps, positions = passes.rows, passes.caps, passes.positions
        device_rows = passes.device_rows
        num_reqs, num_passes = positions.shape[1], positions.shape[0]
        ones = np.ones(num_reqs, dtype=np.int64)
        runner.buffers.wait_for_copies()
        step = prepare_inputs(batch, ones, runner.buffers, self._padded(ones), computed=positions[0])
        drafts: list[torch.Tensor] = []
        # the drafting rows' inputs: their last samples first
        fed = step.input_ids.index_select(0, device_rows)
        for j in range(num_passes):
            if j:
                move_decode_positions(
                    runner.buffers, batch.block_tables, passes.device_positions[j], positions[j] + 1
                )
                for metadata in step.attn_metadata:
                    metadata.max_seq_len = int(positions[j].max()) + 1
                step.input_ids.index_copy_(0, device_rows, fed)
            hidden = self._forward(runner, step)
            logits = self.model.compute_logits(hidden[device_rows])
            drafts.append(logits[:, : self.vocab_size].argmax(dim=-1))
            # the next pass feeds this draft, or (a row at its cap) this pass's token again
            fed = torch.where(j + 1 < passes.device_caps, drafts[-1], fed)
        proposed = torch.stack(drafts, dim=1).cpu().numpy()  # [rows, passes]
        req_ids = output.req_ids
        for i, row in enumerate(rows.tolist()):
            output.draft_token_ids[req_ids[row]] = proposed[i, : caps[i]].tolist()

    def _padded(self, num_scheduled: np.ndarray) -> int | None:
        """The token count a pass pads to for the draft's graphs (None: no graph takes it)."""
        return padded_size(num_scheduled, self.graphs, self.prefill_graphs, self.piecewise)

    def _forward(self, runner: ModelRunner, inputs: StepInputs) -> torch.Tensor:
        """The draft model over a step's inputs, on its own graphs as the target on its (graphs.forward_step)."""
        return forward_step(runner, inputs, self.model, self.graphs, self.prefill_graphs, self.piecewise)

    def capture(
        self,
        runner: ModelRunner,
        piecewise_sizes: list[int],
        prefill_graphs: bool,
        decode_sizes: list[int] | None = None,
        kind: str = "",
    ) -> None:
        """Capture the draft's decode graphs (`decode_sizes`, default the runner's capture sizes), its piecewise
        graphs (`piecewise_sizes` tokens) and, with `prefill_graphs`, its one-request prefill graphs (the same
        buckets), over the runner's step buffers, as the target's; a capture that fails leaves those passes
        eager. `kind` adds to their names in the log (the memory probe's, graph_memory.py)."""
        sizes = decode_sizes if decode_sizes is not None else capture_sizes(runner.max_num_seqs)
        decode = CudaGraphRunner(sizes, "draft model decode batch" + kind)
        decode.capture(lambda size: prepare_decode_capture(runner, size, self.model))
        self.graphs = decode if decode.is_captured else None
        buffers = runner.buffers
        pieces = PiecewiseGraphs(piecewise_sizes, " (draft model)" + kind)
        if piecewise_sizes:
            pieces.capture(lambda size, split: piecewise_forward(self.model, runner.kv_caches,
                           buffers.input_ids[:size], buffers.positions[:size], split))  # fmt: skip
        self.piecewise = pieces if pieces.is_captured else None
        prefill = CudaGraphRunner(piecewise_sizes, "draft model one-request prefill" + kind)
        if piecewise_sizes and prefill_graphs:
            prefill.capture(lambda size: prepare_prefill_capture(runner, size, self.model))
        self.prefill_graphs = prefill if prefill.is_captured else None

    @property
    def memory_bytes(self) -> int:
        """Device memory its captured graphs took."""
        return sum(
            g.memory_bytes for g in (self.graphs, self.piecewise, self.prefill_graphs) if g is not None
        )

    def release_graphs(self) -> None:
        for graphs in (self.graphs, self.piecewise, self.prefill_graphs):
            if graphs is not None:
                graphs.release()
        self.graphs = self.piecewise = self.prefill_graphs = None

    def _drafting_rows(
        self, runner: ModelRunner, inputs: StepInputs, output: ModelRunnerOutput
    ) -> tuple[np.ndarray, np.ndarray]:
        """(batch rows that draft after this step, drafts each may get): rows that sampled a token and may still
        produce more than one, capped by k, max_model_len, max_tokens and their allocated slots."""
        batch = runner.batch
        rows = inputs.sample_rows
        if not rows.size:
            return rows, rows
        num_tokens = batch.num_tokens[rows].astype(np.int64)
        block_size = batch.block_tables[0].block_size
        slots = np.min([table.num_blocks[rows] for table in batch.block_tables], axis=0) * block_size
        left = np.array(
            [
                s.sampling_params.max_tokens - len(s.output_token_ids)
                if s is not None and s.sampling_params.pooling is None
                else 0
                for s in (batch.states[r] for r in rows.tolist())
            ],
            dtype=np.int64,
        )
        caps = np.minimum.reduce(
            [
                np.full(rows.size, self.num_speculative_tokens, dtype=np.int64),
                left - 1,  # the token after the drafts is the step's own sample
                batch.max_model_len - num_tokens - 1,
                slots.astype(np.int64) - num_tokens + 1,
            ]
        )
        has = np.array([bool(output.sampled_token_ids[r]) for r in rows.tolist()], dtype=bool)
        keep = (caps > 0) & has
        return rows[keep], caps[keep]
