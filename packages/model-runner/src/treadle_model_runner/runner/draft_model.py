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
When pass 0 would be one token a row (every decode and verification step), it joins pass 1: one pass of two
tokens a row, the position before each row's pass-1 position and that position (`_pair_pass`), so a step runs k
passes of the draft model, not k + 1. The first of the two is pass 0's position, or after a verification that
rejected drafts the last kept one, whose KV is written again with the same token.

On a GPU the draft model has CUDA graphs of its own, captured after the target's over the same step buffers
(draft_graphs.py); the passes take them as the target's steps take its graphs (graphs.forward_step): one token a
row replays a decode graph, two tokens a row a two-token graph, a one-request prefill a prefill graph, other
steps piecewise graphs. Drafts go back in ModelRunnerOutput's `draft_token_ids`; the scheduler offers them only
while the request's token count is the one they follow.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

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
from treadle_model_runner.runner.device_inputs import move_decode_positions
from treadle_model_runner.runner.draft_graphs import DraftGraphs
from treadle_model_runner.runner.draft_passes import Passes, drafting_rows, plan_passes
from treadle_model_runner.runner.graphs import forward_step, padded_size
from treadle_model_runner.runner.inputs import StepInputs, prepare_inputs
from treadle_model_runner.runner.setup import resolve_max_model_len

if TYPE_CHECKING:
    from treadle_model_runner.models import CausalLM
    from treadle_model_runner.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# a draft's and its target's vocabulary sizes may differ by this much: the same tokenizer, embeddings padded to
# other multiples (Qwen2's 1.5B has 151,936 rows, its 72B 152,064); more means another tokenizer
MAX_VOCAB_PADDING = 128


def join_pool(runner: ModelRunner, target: CausalLM, drafter: torch.nn.Module) -> list[Attention]:
    """The drafter's attention layers, numbered after the target's (their KV joins the same paged pool) and bound to
    the runner's attention backend."""
    offset = len(target.attention_layers())
    layers = [m for m in drafter.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.layer_idx += offset
        layer.bind_backend(runner.attn_backend)
    return layers


class DraftModel:
    # its graphs include two-token ones (pass 0 joined with pass 1)
    two_token_graphs = True

    def __init__(self, runner: ModelRunner, config: SpeculativeConfig) -> None:
        """Load the draft model of `config` on the runner's device, in its dtype, its attention layers numbered
        after the target's (call after the target is loaded)."""
        assert config.model is not None
        target = runner._require_model()
        draft_config = dataclasses.replace(
            runner.model_config, model=config.model, tokenizer=None, quantization=None,
            load_format="dummy" if runner.model_config.load_format == "dummy" else "auto",
            max_model_len=runner.max_model_len, served_model_name=None, hf_overrides=None,
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
        self.sets = DraftGraphs()  # its CUDA graphs (draft_graphs.py), once captured
        # drafts are target token ids: a larger draft vocabulary's extra ids are never proposed
        self.vocab_size = min(draft_vocab, runner.vocab_size)
        self.layers = join_pool(runner, target, self.model)
        logger.info(
            "speculative decoding: draft model %s (%s, %d layers, %s) proposes up to %d tokens a step",
            resolved.path, type(self.model).__name__, len(self.layers), resolved.format,
            self.num_speculative_tokens,
        )  # fmt: skip

    @torch.inference_mode()
    def propose(self, runner: ModelRunner, inputs: StepInputs, output: ModelRunnerOutput) -> None:
        """Pass 0 over the step's positions the draft has no KV for yet, then passes 1..k for the rows that
        sampled (pass 0 and pass 1 as one two-token pass where pass 0 is one token a row); fills
        output.draft_token_ids. The host prepares the passes before they are queued (the device
        is idle then: the step's tokens just reached the host); passes 2..k then run back to back on the
        device, each moving the positions and feeding the draft before without the host."""
        batch = runner.batch
        num_reqs = inputs.num_reqs
        # each row's positions after this step's tokens (the draft's KV is valid below it once pass 0 ran)
        step_end = batch.num_computed_tokens[:num_reqs] + inputs.num_scheduled
        rows, caps = drafting_rows(runner, inputs, output, self.num_speculative_tokens)
        # the passes' positions go to the device first, while it is idle (a copy from pageable memory waits)
        passes = plan_passes(runner, rows, caps, step_end - 1) if rows.size else None
        needed = self._needed(runner, inputs, step_end)
        if passes is not None and self._merges(needed, passes):
            self._draft(runner, output, passes, pair=True)
        else:
            self._pass_zero(runner, inputs, step_end, needed)
            if passes is not None:
                self._draft(runner, output, passes)
        # what the next step's pass 0 may skip: positions below the new tokens, and the drafts' positions
        ends = np.minimum(step_end, batch.num_tokens[:num_reqs] - 1)
        ends[rows] = batch.num_tokens[rows] - 1 + caps
        for row, end in enumerate(ends.tolist()):
            state = batch.states[row]
            assert state is not None
            state.draft_kv_end = end

    @staticmethod
    def _needed(runner: ModelRunner, inputs: StepInputs, step_end: np.ndarray) -> np.ndarray:
        """Per row, how many of the step's last positions the draft has no KV for (at least 1). A decode or
        verification step's have mostly been written by the last step's passes 1..k (the same tokens: its last
        sample and the drafts the scheduler kept), leaving none or the last draft's position: 1."""
        batch = runner.batch
        num_reqs = inputs.num_reqs
        computed = batch.num_computed_tokens[:num_reqs]
        known = np.array([s.draft_kv_end for s in batch.states[:num_reqs] if s is not None], dtype=np.int64)
        return np.maximum(step_end - np.clip(known, computed, step_end), 1)

    def _merges(self, needed: np.ndarray, passes: Passes) -> bool:
        """Whether pass 0 joins pass 1 as one pass of two tokens a row (`_draft`): every row needs only its last
        scheduled position, none starts at position 0, and that pass replays a two-token graph (or no pass
        replays graphs here)."""
        if (needed != 1).any() or (passes.positions[0] < 1).any():
            return False
        pairs = self.sets.pairs
        return self.sets.graphs is None or (pairs is not None and pairs.plan(needed + 1) is not None)

    def _pass_zero(
        self, runner: ModelRunner, inputs: StepInputs, step_end: np.ndarray, needed: np.ndarray
    ) -> None:
        """The draft over the step's positions it has no KV for (`needed`): on decode and verification steps one
        token a row (a row with none runs its last position again), a decode graph. Otherwise (prefill chunks)
        it runs over the step's own inputs."""
        batch = runner.batch
        if (needed == inputs.num_scheduled).all():
            self._forward(runner, inputs)
            return
        runner.buffers.wait_for_copies()
        step = prepare_inputs(batch, needed, runner.buffers, self._padded(needed), computed=step_end - needed)
        self._forward(runner, step)

    def _draft(
        self, runner: ModelRunner, output: ModelRunnerOutput, passes: Passes, pair: bool = False
    ) -> None:
        """Passes 1..k: greedy drafts into output.draft_token_ids. With `pair` pass 1 also does pass 0's work: two
        tokens a row, each row's position before its pass-1 position too (the last scheduled one, or after a
        verification that rejected drafts the last kept, its KV written again with the same token); one pass of
        the draft model fewer a step."""
        batch = runner.batch
        rows, caps, positions = passes.rows, passes.caps, passes.positions
        device_rows = passes.device_rows
        num_reqs, num_passes = positions.shape[1], positions.shape[0]
        drafts: list[torch.Tensor] = []
        if pair:
            drafts.append(self._pair_pass(runner, positions[0], device_rows))
        ones = np.ones(num_reqs, dtype=np.int64)
        runner.buffers.wait_for_copies()
        step = prepare_inputs(batch, ones, runner.buffers, self._padded(ones), computed=positions[0])
        # the drafting rows' inputs: their last samples first
        fed = step.input_ids.index_select(0, device_rows)
        if pair:
            fed = torch.where(passes.device_caps > 1, drafts[-1], fed)
        for j in range(len(drafts), num_passes):
            if j:
                move_decode_positions(
                    runner.buffers, batch.block_tables, passes.device_positions[j], positions[j] + 1
                )
                for metadata in step.attn_metadata:
                    metadata.max_seq_len = int(positions[j].max()) + 1
                step.input_ids.index_copy_(0, device_rows, fed)
            drafts.append(self._greedy(self._forward(runner, step)[device_rows]))
            # the next pass feeds this draft, or (a row at its cap) this pass's token again
            fed = torch.where(j + 1 < passes.device_caps, drafts[-1], fed)
        proposed = torch.stack(drafts, dim=1).cpu().numpy()  # [rows, passes]
        req_ids = output.req_ids
        for i, row in enumerate(rows.tolist()):
            output.draft_token_ids[req_ids[row]] = proposed[i, : caps[i]].tolist()

    def _pair_pass(self, runner: ModelRunner, last: np.ndarray, device_rows: torch.Tensor) -> torch.Tensor:
        """The draft over positions `last` - 1 and `last` of every row (their known tokens); the drafting rows'
        greedy next tokens after `last`."""
        twos = np.full(len(last), 2, dtype=np.int64)
        plan = self.sets.pairs.plan(twos) if self.sets.pairs is not None else None
        runner.buffers.wait_for_copies()
        step = prepare_inputs(runner.batch, twos, runner.buffers, plan.tokens if plan else None, computed=last - 1,
                              num_padded_reqs=plan.reqs if plan else None)  # fmt: skip
        hidden = self._forward(runner, step, pairs=True)
        return self._greedy(hidden[device_rows * 2 + 1])  # each row's second token

    def _greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """The draft model's greedy next token after each of `hidden`'s rows, among the target's token ids."""
        return self.model.compute_logits(hidden)[:, : self.vocab_size].argmax(dim=-1)

    def _padded(self, num_scheduled: np.ndarray) -> int | None:
        """The token count a pass pads to for the draft's graphs (None: no graph takes it)."""
        return padded_size(num_scheduled, self.sets.graphs, self.sets.prefill_graphs, self.sets.piecewise)

    def _forward(self, runner: ModelRunner, inputs: StepInputs, pairs: bool = False) -> torch.Tensor:
        """The draft model over a step's inputs, on its own graphs as the target on its (graphs.forward_step);
        `pairs`: a two-token pass, which may take the two-token graphs."""
        sets = self.sets
        return forward_step(runner, inputs, self.model, sets.graphs, sets.prefill_graphs, sets.piecewise,
                            sets.pairs if pairs else None)  # fmt: skip

    def capture(
        self,
        runner: ModelRunner,
        piecewise_sizes: list[int],
        prefill_graphs: bool,
        decode_sizes: list[int] | None = None,
        kind: str = "",
    ) -> None:
        """Capture the draft's graphs over the runner's step buffers (draft_graphs.DraftGraphs.capture)."""
        self.sets.capture(runner, self.model, piecewise_sizes, prefill_graphs, decode_sizes, kind,
                          pairs=self.two_token_graphs)  # fmt: skip

    @property
    def memory_bytes(self) -> int:
        """Device memory its captured graphs took."""
        return self.sets.memory_bytes

    def release_graphs(self) -> None:
        self.sets.release()
