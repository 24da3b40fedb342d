"""EAGLE-3 speculative decoding in the runner (speculative_config method eagle3, as vLLM's).

An EAGLE-3 head (models/llama_eagle3.py) drafts each request's next k tokens greedily from the target's own hidden
states: the target keeps the residual stream entering three of its layers (`LlamaModel.aux_layers`, set only while
EAGLE-3 is on), `fc` mixes them. Like a draft model (draft_model.py, whose bookkeeping this reuses: the drafting
rows, their caps, ModelRunnerOutput.draft_token_ids) the head's attention layer is numbered after the target's and
keeps its KV in the same paged pool, blocks and slot mapping.

Draft slot p pairs the token at p + 1 with a hidden state for position p (rope at p). After each step:
  - pass 0: every row's slots [c, e) where c is its first position this step and e = min(step end, N - 1) with N
    its token count after the step: the tokens at c + 1 .. e, with the target's hidden states at c .. e - 1 of this
    step (a verification that rejected drafts keeps only the accepted positions' hidden states). It writes the
    head's KV there from the target's own features, so slots below the next step's first position always hold
    them (a drafting pass's KV at an accepted draft's slot is rewritten so), and its last row (slot N - 2, the
    token just sampled) gives draft 1.
  - passes j = 1 .. k - 1 (only when some row drafts more than one token): one token a row, at slot N - 2 + j:
    draft j with the head's own output hidden state at slot N - 3 + j; its greedy next token is draft j + 1. A row
    past its cap, or that does not draft, runs its last pass again (the same token, hidden state and slot: the
    same KV). The highest slot written is N - 3 + cap, within the lookahead the scheduler allocates.
Slots of a prefix-cache hit were written by the request that computed them; the hit's last block, whose last slot
paired its position with that request's next token, is computed again (engine-core's KV manager, drop_last_hit).
The head's draft ids map to target ids through d2t. CUDA graphs: the target keeps its own; its forward writes the
tapped hidden states into a persistent buffer (models/aux_hidden.py), which a replayed graph writes as the eager
forward does. The head's passes take the draft model's graph sets (draft_graphs.py: decode graphs for one token a
row, piecewise and one-request prefill graphs for pass 0), its hidden-state input a persistent buffer too
(`Eagle3LlamaForCausalLM.hidden_in`), written before each pass.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from treadle_model_runner.config import SpeculativeConfig
from treadle_model_runner.models.aux_hidden import keep_aux
from treadle_model_runner.outputs import ModelRunnerOutput
from treadle_model_runner.runner.device_inputs import move_decode_positions
from treadle_model_runner.runner.draft_graphs import DraftGraphs
from treadle_model_runner.runner.draft_model import DraftModel, join_pool
from treadle_model_runner.runner.draft_passes import drafting_rows
from treadle_model_runner.runner.eagle3_load import load_eagle3_head, target_decoder
from treadle_model_runner.runner.inputs import StepInputs, gather_input_ids, prepare_inputs
from treadle_model_runner.sample.drafts import concat_ranges

if TYPE_CHECKING:
    from treadle_model_runner.runner.model_runner import ModelRunner

__all__ = ["Eagle3Drafter", "load_drafter"]

logger = logging.getLogger(__name__)


def load_drafter(runner: ModelRunner, config: SpeculativeConfig | None) -> DraftModel | None:
    """The runner's drafter for `config`'s method: a draft model, an EAGLE-3 head, or None (n-gram or off)."""
    if config is None or not config.drafts_in_runner:
        return None
    return Eagle3Drafter(runner, config) if config.method == "eagle3" else DraftModel(runner, config)


class Eagle3Drafter(DraftModel):
    # no graphs of two tokens a row: the head's passes are one token a row, or a step's positions
    two_token_graphs = False

    def __init__(self, runner: ModelRunner, config: SpeculativeConfig) -> None:
        """Load the head of `config` on the runner's device in its dtype, its attention layer numbered after the
        target's, and make the target keep the hidden states it reads (call after the target is loaded)."""
        assert config.model is not None
        target = runner._require_model()
        self.head, aux_layers = load_eagle3_head(config.model, target, runner.dtype, runner.device,
                                                  runner.max_model_len)  # fmt: skip
        self.model = self.head
        self.decoder = target_decoder(target)
        max_num_tokens = max(runner.max_num_batched_tokens, runner.max_num_seqs)  # the step buffers' size
        keep_aux(self.decoder, aux_layers, max_num_tokens)
        self.head.allocate(max_num_tokens)
        self.num_speculative_tokens = config.num_speculative_tokens
        self.sets = DraftGraphs()  # its CUDA graphs (draft_graphs.py, no two-token ones), once captured
        self.vocab_size = runner.vocab_size
        self.layers = join_pool(runner, target, self.head)
        logger.info(
            "speculative decoding: EAGLE-3 head %s (draft vocabulary %d) reads target layers %s and proposes up to "
            "%d tokens a step", config.model, self.head.draft_vocab_size,
            list(aux_layers), self.num_speculative_tokens,
        )  # fmt: skip

    @torch.inference_mode()
    def propose(self, runner: ModelRunner, inputs: StepInputs, output: ModelRunnerOutput) -> None:
        """Pass 0 over the step's positions with the target's hidden states, then passes 1..k-1 for the rows that
        draft more than one token (module docstring); fills output.draft_token_ids."""
        batch = runner.batch
        num_reqs = inputs.num_reqs
        aux = self.decoder.aux_hidden
        assert aux is not None, "the target kept no hidden states for EAGLE-3 this step"
        first = batch.num_computed_tokens[:num_reqs].astype(np.int64)
        ends = np.minimum(first + inputs.num_scheduled, batch.num_tokens[:num_reqs] - 1)
        # a row with no slot to fill (a pooling row at its end) runs its first position, never read
        counts = np.maximum(ends - first, 1)
        last_rows, out, tokens, hidden = self._feature_pass(runner, inputs, aux, first, counts)
        rows, caps = drafting_rows(runner, inputs, output, self.num_speculative_tokens)
        if not rows.size:
            return
        drafts = [self.head.greedy(out[last_rows])]
        num_passes = int(caps.max())
        if num_passes > 1:
            row_caps = np.ones(num_reqs, dtype=np.int64)
            row_caps[rows] = caps
            slots = first + counts - 1
            drafts = self._drafting_passes(
                runner, slots, row_caps, num_passes, drafts[0], out[last_rows], tokens, hidden
            )
        proposed = torch.stack(drafts, dim=1).cpu().numpy()  # [R, passes]
        for row, cap in zip(rows.tolist(), caps.tolist(), strict=True):
            output.draft_token_ids[output.req_ids[row]] = proposed[row, :cap].tolist()

    def _feature_pass(
        self,
        runner: ModelRunner,
        inputs: StepInputs,
        aux: torch.Tensor,
        first: np.ndarray,
        counts: np.ndarray,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The head over slots [first, first + counts) of each row, fed the next tokens and the target's hidden
        states there. Returns (each row's last token index [R], the head's outputs [T0, H], and each row's last
        input token [R] and hidden state [R, H])."""
        batch, buffers = runner.batch, runner.buffers
        buffers.wait_for_copies()
        same = bool((counts == inputs.num_scheduled).all())
        step = (
            inputs if same else prepare_inputs(batch, counts, buffers, self._padded(counts), computed=first)
        )
        num_tokens = int(counts.sum())
        query_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # the token after each slot's position (a row's last: its new sample, or its next prompt token)
        ids = np.empty(num_tokens, dtype=batch.token_ids.dtype)
        gather_input_ids(batch, first + 1, counts, query_start, out=ids)
        step.input_ids[:num_tokens].copy_(torch.from_numpy(np.maximum(ids, 0).astype(np.int64)))
        device = runner.device
        if same:
            features = aux[:num_tokens]
        else:
            index = concat_ranges(inputs.query_start[:-1], counts)
            features = aux.index_select(0, torch.from_numpy(index).to(device))
        hidden = self.head.combine(features)  # [T0, H]
        out = self._run(runner, step, hidden)
        last = torch.from_numpy(query_start[1:] - 1).to(device)
        return last, out, step.input_ids.index_select(0, last), hidden.index_select(0, last)

    def _drafting_passes(
        self,
        runner: ModelRunner,
        slots: np.ndarray,
        caps: np.ndarray,
        num_passes: int,
        draft: torch.Tensor,
        out: torch.Tensor,
        tokens: torch.Tensor,
        hidden: torch.Tensor,
    ) -> list[torch.Tensor]:
        """Passes 1 .. num_passes - 1, one token a row (module docstring). `slots` [R]: each row's last pass-0 slot;
        `caps` [R]: its drafts (1 for a row that does not draft); `draft`, `out`, `tokens`, `hidden` [R]: pass 0's
        draft 1, output hidden state, and input token and hidden state at that slot. Returns drafts 1..num_passes."""
        batch, buffers, device = runner.batch, runner.buffers, runner.device
        num_reqs = len(slots)
        # [passes, R] each row's slot in each pass: on from pass 0's, then its last again once past its cap
        positions = slots[None, :] + np.minimum(np.arange(num_passes)[:, None], caps[None, :] - 1)
        device_positions = torch.from_numpy(positions).to(device)
        device_caps = torch.from_numpy(caps).to(device)
        buffers.wait_for_copies()
        ones = np.ones(num_reqs, dtype=np.int64)
        step = prepare_inputs(batch, ones, buffers, self._padded(ones), computed=positions[1])
        drafts = [draft]
        for j in range(1, num_passes):
            if j > 1:
                move_decode_positions(buffers, batch.block_tables, device_positions[j], positions[j] + 1)
                for metadata in step.attn_metadata:
                    metadata.max_seq_len = int(positions[j].max()) + 1
            going = device_caps > j
            tokens = torch.where(going, drafts[-1], tokens)
            hidden = torch.where(going[:, None], out, hidden)
            step.input_ids[:num_reqs].copy_(tokens)
            out = self._run(runner, step, hidden)
            drafts.append(self.head.greedy(out))
        return drafts

    def _run(self, runner: ModelRunner, step: StepInputs, hidden: torch.Tensor) -> torch.Tensor:
        """The head over `step`'s tokens fed `hidden` [T, H] (T: the step's real tokens), on its graphs where one
        takes the step (as the draft model's passes, DraftModel._forward); its outputs [T, H]. A replayed graph
        writes the same output tensor each time: read it before the next pass."""
        num_tokens = hidden.shape[0]
        self.head.hidden_in[:num_tokens].copy_(hidden)
        return self._forward(runner, step)[:num_tokens]
