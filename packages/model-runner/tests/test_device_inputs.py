"""Device-built step inputs equal the old host (numpy) formulas, bit for bit, on random persistent batches.

A small simulated scheduler drives the real persistent batch (`apply_scheduler_output`) through random steps:
new requests with prefix hits, chunked prefills, decodes, unscheduled and resumed requests, finished and
preempted ones, random block ids in two KV-cache groups of different block sizes, decode-graph padding (and the
capture-time batch of padding only), and async-output placeholders. Every step's StepInputs is compared with
`reference`, the numpy code that built the inputs on the host before they moved to the device. A steady decode
batch sends no block-table row to the device.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from treadle_model_runner.runner.block_table import BlockTable
from treadle_model_runner.runner.device_inputs import StepBuffers, move_decode_positions
from treadle_model_runner.runner.input_batch import InputBatch
from treadle_model_runner.runner.inputs import StepInputs, prepare_inputs
from treadle_model_runner.runner.request_state import RequestState
from treadle_model_runner.runner.state import apply_scheduler_output
from treadle_model_runner.sampling_params import SamplingParams
from treadle_model_runner.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput

CPU = torch.device("cpu")
MAX_REQS, MAX_LEN, MAX_TOKENS = 8, 96, 48
BLOCK_SIZES = (4, 8)  # one KV-cache group each
PLACEHOLDER = -1


def make_batch() -> InputBatch:
    batch = InputBatch(MAX_REQS, MAX_LEN, BLOCK_SIZES[0], len(BLOCK_SIZES), CPU)
    batch.block_tables = [BlockTable(MAX_REQS, -(-MAX_LEN // bs), bs, CPU) for bs in BLOCK_SIZES]
    return batch


def reference(
    batch: InputBatch, num_scheduled: np.ndarray, padded: int | None, truth: dict[int, int]
) -> dict:
    """The old host formulas; `truth`: batch row -> value of its placeholder input token."""
    num_reqs, num_tokens = len(num_scheduled), int(num_scheduled.sum())
    padded = num_tokens if padded is None else padded
    is_decode_only = bool(num_reqs > 0 and (num_scheduled == 1).all())
    num_pad = padded - num_tokens if is_decode_only or num_reqs == 0 else 0
    cu = np.cumsum(num_scheduled, dtype=np.int64)
    query_start = np.concatenate([[0], cu]).astype(np.int64)
    req_idx = np.repeat(np.arange(num_reqs), num_scheduled)
    computed = batch.num_computed_tokens[:num_reqs]
    positions = computed[req_idx] + np.arange(num_tokens) - query_start[req_idx]
    seq_lens = computed + num_scheduled
    ids = batch.token_ids[req_idx, positions].astype(np.int64)
    for t in np.flatnonzero(ids < 0):
        ids[t] = truth[int(req_idx[t])]

    def pad(values: np.ndarray, fill: int) -> np.ndarray:
        return np.concatenate([values, np.full(padded - num_tokens, fill)])

    n_meta = num_reqs + num_pad
    qsl = np.concatenate([query_start, num_tokens + np.arange(1, num_pad + 1)])
    seq_all = np.concatenate([seq_lens, np.ones(num_pad, dtype=np.int64)])
    sample_rows = np.nonzero(seq_lens >= batch.num_tokens[:num_reqs])[0]
    slots = []
    for table in batch.block_tables:
        bs = table.block_size
        slots.append(pad(table.np[req_idx, positions // bs].astype(np.int64) * bs + positions % bs, -1))
    i64, i32 = torch.int64, torch.int32
    return {
        "input_ids": torch.tensor(pad(ids, 0), dtype=i64),
        "positions": torch.tensor(pad(positions, 0), dtype=i64),
        "query_start_loc": torch.tensor(qsl, dtype=i32),
        "seq_lens": torch.tensor(seq_all, dtype=i32),
        "slot_mappings": [torch.tensor(s, dtype=i64) for s in slots],
        "block_tables": [torch.tensor(t.np[:n_meta], dtype=i32) for t in batch.block_tables],
        "logits_indices": torch.tensor(cu[sample_rows] - 1, dtype=i64),
        "sample_rows": sample_rows,
        "query_start": query_start,
        "num_actual_tokens": padded if num_pad else num_tokens,
        "max_query_len": max(int(num_scheduled.max()) if num_reqs else 0, 1 if num_pad else 0),
        "max_seq_len": int(seq_all.max()) if n_meta else 0,
        "is_decode_only": is_decode_only,
        "padded": padded,
    }


def assert_same(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype}, expected {want.dtype}"
    assert torch.equal(got, want), f"{name}:\n got  {got.tolist()}\n want {want.tolist()}"


def check(inputs: StepInputs, want: dict, batch: InputBatch) -> None:
    assert_same(inputs.input_ids, want["input_ids"], "input_ids")
    assert_same(inputs.positions, want["positions"], "positions")
    assert_same(inputs.logits_indices, want["logits_indices"], "logits_indices")
    assert np.array_equal(inputs.sample_rows, want["sample_rows"])
    assert np.array_equal(inputs.query_start, want["query_start"])
    assert inputs.num_padded_tokens == want["padded"] and inputs.is_decode_only == want["is_decode_only"]
    for g, meta in enumerate(inputs.attn_metadata):
        for name in ("query_start_loc", "seq_lens"):
            assert_same(getattr(meta, name), want[name], name)
            assert_same(getattr(meta, f"{name}_cpu"), want[name], f"{name}_cpu")
        assert_same(meta.slot_mapping, want["slot_mappings"][g], f"slot_mapping[{g}]")
        assert_same(meta.block_table, want["block_tables"][g], f"block_table[{g}]")
        assert (meta.num_actual_tokens, meta.max_query_len, meta.max_seq_len) == (
            want["num_actual_tokens"], want["max_query_len"], want["max_seq_len"],
        )  # fmt: skip
    for table in batch.block_tables:  # the device mirror equals the host table, rows past the batch included
        assert torch.equal(table.device_table, torch.from_numpy(table.np))


@dataclass
class SimRequest:
    req_id: str
    tokens: list[int]  # prompt then outputs; PLACEHOLDER while the sampled value is in flight
    num_prompt: int
    num_computed: int
    blocks: list[list[int]] = field(default_factory=lambda: [[] for _ in BLOCK_SIZES])
    is_sent: bool = False  # the runner holds its state (else it is sent in full as new)


class Sim:
    """A random scheduler and sampler around the real persistent batch."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.batch = make_batch()
        self.states: dict[str, RequestState] = {}  # the runner's request states
        self.buffers = StepBuffers(MAX_TOKENS, MAX_REQS, len(BLOCK_SIZES), CPU)
        self.live: dict[str, SimRequest] = {}
        self.num_created = 0
        self.inflight: dict[str, tuple[int, int]] = {}  # request -> (position, value) of its placeholder
        self.finished: set[str] = set()

    def new_request(self) -> SimRequest:
        rng = self.rng
        n = rng.randint(1, 40)
        hit = rng.randrange(
            0, n, BLOCK_SIZES[-1]
        )  # prefix hit: whole blocks, always one token left to compute
        self.num_created += 1
        req = SimRequest(f"r{self.num_created}", [rng.randrange(1000) for _ in range(n)], n, hit)
        self.live[req.req_id] = req
        return req

    def resolve_inflight(self) -> None:
        for req_id, (pos, value) in self.inflight.items():
            if (req := self.live.get(req_id)) is not None:
                req.tokens[pos] = value
            if (state := self.states.get(req_id)) is not None:
                state.output_token_ids[pos - len(state.prompt_token_ids)] = value
            if (row := self.batch.req_id_to_row.get(req_id)) is not None:
                self.batch.token_ids[row, pos] = value
        self.inflight.clear()

    def schedule(self) -> SchedulerOutput:
        rng = self.rng
        preempted: set[str] = set()
        candidates = []
        for req in list(self.live.values()):
            u = rng.random()
            if len(req.tokens) >= MAX_LEN - 1 or u < 0.08:
                self.finished.add(req.req_id)
                del self.live[req.req_id]
            elif u < 0.13 and req.req_id not in self.inflight and req.is_sent:
                preempted.add(req.req_id)
                req.num_computed, req.is_sent = 0, False
                req.blocks = [[] for _ in BLOCK_SIZES]
            elif u > 0.2:
                candidates.append(req)
        candidates += [self.new_request() for _ in range(rng.choice((0, 0, 0, 1, 2, 3)))]
        new, cached, scheduled, budget = [], CachedRequestData(), {}, MAX_TOKENS
        for req in candidates:
            if len(scheduled) == MAX_REQS or budget == 0:
                break
            left = len(req.tokens) - req.num_computed
            q = min(left if rng.random() < 0.5 else rng.randint(1, left), budget)
            budget -= q
            scheduled[req.req_id] = q
            fresh = []
            for g, bs in enumerate(BLOCK_SIZES):
                need = -(-(req.num_computed + q) // bs) - len(req.blocks[g])
                fresh.append([rng.randrange(1, 5000) for _ in range(max(need, 0))])
                req.blocks[g] += fresh[-1]
            if req.is_sent:
                cached.req_ids.append(req.req_id)
                cached.new_block_ids.append(tuple(fresh) if any(fresh) else None)
                cached.num_computed_tokens.append(req.num_computed)
            else:
                new.append(NewRequestData(req.req_id, req.tokens[: req.num_prompt], SamplingParams(),
                                          tuple(list(b) for b in req.blocks), req.num_computed,
                                          req.tokens[req.num_prompt :]))  # fmt: skip
                req.is_sent = True
        so = SchedulerOutput(new, cached, scheduled, sum(scheduled.values()), self.finished, preempted)
        self.finished = set()
        return so

    def step(self) -> None:
        rng, batch = self.rng, self.batch
        if rng.random() < 0.3:
            self.resolve_inflight()  # a step that needed host tokens
        so = self.schedule()
        apply_scheduler_output(batch, self.states, so)
        ids = [r for r in batch.req_ids[: batch.num_reqs] if r is not None]
        num_scheduled = np.array([so.num_scheduled_tokens[r] for r in ids], dtype=np.int64)
        if rng.random() < 0.15:  # CUDA-graph capture: padding requests only, over whatever rows hold
            size = rng.randint(1, MAX_REQS)
            empty = np.zeros(0, dtype=np.int64)
            check(prepare_inputs(batch, empty, self.buffers, size), reference(batch, empty, size, {}), batch)
        padded = None
        if ids and (num_scheduled == 1).all() and rng.random() < 0.6:
            padded = rng.randint(len(ids), MAX_REQS)
        order = list(self.inflight)
        values = torch.tensor([self.inflight[r][1] for r in order], dtype=torch.int64)

        def source(rows: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
            return values, np.array([order.index(ids[r]) for r in rows.tolist()], dtype=np.int64)

        truth = {row: self.inflight[r][1] for row, r in enumerate(ids) if r in self.inflight}
        want = reference(batch, num_scheduled, padded, truth)
        inputs = prepare_inputs(batch, num_scheduled, self.buffers, padded, source if order else None)
        check(inputs, want, batch)

        for row, req_id in enumerate(ids):
            self.live[req_id].num_computed += int(num_scheduled[row])
        self.resolve_inflight()
        is_async = rng.random() < 0.6
        rows = inputs.sample_rows
        tokens = [rng.randrange(1000) for _ in rows]
        batch.append_tokens(rows, np.array([PLACEHOLDER if is_async else t for t in tokens], dtype=np.int32))
        for row, value in zip(rows.tolist(), tokens, strict=True):
            req = self.live[ids[row]]
            if is_async:
                self.inflight[req.req_id] = (len(req.tokens), value)
            state = self.states[req.req_id]
            state.output_token_ids.append(PLACEHOLDER if is_async else value)
            req.tokens.append(PLACEHOLDER if is_async else value)


@pytest.mark.parametrize("seed", range(6))
def test_device_inputs_equal_host_reference(seed: int) -> None:
    sim = Sim(seed)
    for _ in range(40):
        sim.step()


def test_steady_decode_commits_no_block_table_rows() -> None:
    batch, buffers = make_batch(), StepBuffers(MAX_TOKENS, MAX_REQS, len(BLOCK_SIZES), CPU)
    for i in range(4):
        blocks = tuple(
            [10 * i + g + 1 for g in range(2)] for _ in BLOCK_SIZES
        )  # room for 8+ tokens per group
        batch.add(RequestState(f"r{i}", [1, 2, 3], SamplingParams(), blocks, num_computed_tokens=2))
    ones = np.ones(4, dtype=np.int64)

    def step() -> list[int]:
        inputs = prepare_inputs(batch, ones, buffers, 8)
        check(inputs, reference(batch, ones, 8, {}), batch)
        n = len(ones)
        batch.append_tokens(np.arange(n), np.full(n, 7, dtype=np.int32))
        batch.num_computed_tokens[:n] += 1
        return [table.num_committed_rows for table in batch.block_tables]

    assert step() == [4, 4]  # the new rows
    assert step() == [0, 0] and step() == [0, 0]  # steady decode: nothing goes to the device
    batch.block_tables[0].append(2, [99])
    assert step() == [1, 0]  # one appended block: one row
    batch.remove("r0")
    batch.condense()  # r3 moves into row 0; row 3, vacated, is cleared to the null block
    ones = ones[:3]
    assert step() == [2, 2]
    assert step() == [0, 0]


def test_vacated_rows_point_padding_at_the_null_block() -> None:
    """Decode-graph padding requests read the first block-table entry of rows past num_reqs: after requests leave
    (the start-up profiling pass, finished requests) that entry must be block 0, not a stale id that may lie past
    a smaller cache (the graph-memory probe captures over a one-block cache)."""
    batch, buffers = make_batch(), StepBuffers(MAX_TOKENS, MAX_REQS, len(BLOCK_SIZES), CPU)
    for i in range(3):
        batch.add(RequestState(f"r{i}", [1] * 9, SamplingParams(), ([5 + i, 9 + i, 13],) * 2, 0))
    prepare_inputs(batch, np.full(3, 9, dtype=np.int64), buffers)
    batch.remove("r0")
    batch.remove("r2")
    batch.condense()  # r1 moves to row 0
    inputs = prepare_inputs(batch, np.zeros(0, dtype=np.int64), buffers, 4)  # capture: padding only
    for table in batch.block_tables:
        assert table.device_table[:, 0].tolist() == [6] + [0] * (MAX_REQS - 1)
    assert inputs.num_padded_tokens == 4


@pytest.mark.parametrize("seed", range(5))
def test_moving_a_decode_batch_equals_building_it_there(seed: int) -> None:
    """A draft model's passes move a one-token-per-row batch to new positions on the device
    (`move_decode_positions`): positions, seq_lens (both copies) and every group's slot mapping equal a fresh
    prepare_inputs at those positions, decode-graph padding rows included."""
    rng = np.random.default_rng(seed)
    batch, buffers = make_batch(), StepBuffers(MAX_TOKENS, MAX_REQS, len(BLOCK_SIZES), CPU)
    num_reqs = int(rng.integers(1, MAX_REQS - 1))
    for i in range(num_reqs):
        blocks = tuple(
            rng.choice(np.arange(1, 200), MAX_LEN // bs, replace=False).tolist() for bs in BLOCK_SIZES
        )
        batch.add(RequestState(f"r{i}", [1] * MAX_LEN, SamplingParams(), blocks, num_computed_tokens=0))
    ones = np.ones(num_reqs, dtype=np.int64)
    padded = num_reqs + 2
    start = rng.integers(0, MAX_LEN - 8, num_reqs)
    prepare_inputs(batch, ones, buffers, padded, computed=start)
    for step in range(1, 4):
        moved = start + step * rng.integers(0, 2, num_reqs)  # some rows move, some stay
        move_decode_positions(buffers, batch.block_tables, torch.from_numpy(moved), moved + 1)
        got = (buffers.positions[:padded].clone(), buffers.seq_lens[: padded].clone(),
               buffers.seq_lens_cpu[: padded].clone(), [s[:padded].clone() for s in buffers.slot_mappings])  # fmt: skip
        fresh = StepBuffers(MAX_TOKENS, MAX_REQS, len(BLOCK_SIZES), CPU)
        prepare_inputs(batch, ones, fresh, padded, computed=moved)
        assert torch.equal(got[0], fresh.positions[:padded])
        assert torch.equal(got[1], fresh.seq_lens[:padded]) and torch.equal(
            got[2], fresh.seq_lens_cpu[:padded]
        )
        for slots, want in zip(got[3], fresh.slot_mappings, strict=True):
            assert torch.equal(slots, want[:padded])
