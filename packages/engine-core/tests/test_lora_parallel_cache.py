"""LoRA under tensor parallelism and async scheduling, through the EngineCore: two gloo ranks on CPU, max_loras 1,
max_cpu_loras 2, adapter directories deleted while the engine serves (lora_tp_engine.py builds it all).

The workers' adapter host caches must hold what rank 0's holds after every call (model_runner's lora/host_cache.py:
rank 0 decides, the workers follow), so an adapter rank 0 kept runs on every rank even once its directory is gone,
and an adapter a worker cannot read fails the one request that needed it, never the engine.
- Slowed rank-0 steps (its step thread then releases and refreshes adapters after the engine thread's next calls)
  made the two caches evict different adapters: the worker dropped one rank 0 kept, whose directory then went,
  and the step that ran it ended the engine. Now the request runs, with the tokens it had before.
- A worker that cannot read an adapter rank 0 has just read (deleted in between) fails that request at admission
  with an error output, or the add_request with a ValueError; the engine then serves the next request.
- A random sequence of requests, adapter loads, removals and deleted / restored directories: after every step each
  rank holds the same adapters, and every request ends with its adapter's tokens or an error saying its adapter
  could not be loaded again.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from lora_tp_engine import Driver, build_model, run_engine, write_adapter

from treadle_model_runner.lora import LoRARequest

pytestmark = pytest.mark.timeout(600)
PROMPT = [5, 17, 33, 8, 61, 12, 40]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("lora_tp"))


def _adapters(root: Path, names: str) -> dict[str, LoRARequest]:
    return {n: LoRARequest(n, i + 1, str(write_adapter(root / n, seed=10 + i))) for i, n in enumerate(names)}


# ---- an adapter rank 0 kept, its directory gone -----------------------------------------------------------------
def _kept_adapter_runs(d: Driver, lora: dict[str, LoRARequest]) -> dict[str, Any]:
    for name in ("A", "B"):  # each adapter's tokens while its directory is there; B ends in the one slot
        d.add(f"{name}_before", PROMPT, lora[name], max_tokens=6)
        d.run()
    d.add("base", PROMPT, None, max_tokens=6)
    # one step, which puts A in the slot: it reads A from host memory (refreshing it there), and no later step does
    d.add("a_short", PROMPT, lora["A"], max_tokens=1)
    d.step()  # that step is sent; rank 0 starts it late
    d.engine.add_lora(lora["B"])  # refreshes B before rank 0's step refreshes A, after the worker's did
    d.run()
    d.add("base_again", PROMPT, None, max_tokens=1)  # its steps release a_short: A and B are held by nobody
    d.run()
    d.engine.add_lora(lora["C"])  # evicts the one of A and B used least recently
    kept = d.engine.list_loras()
    # C takes the one slot: the adapter that runs next is read from host memory
    d.add("C_mid", PROMPT, lora["C"], max_tokens=2)
    d.run()
    for name in ("A", "B"):
        shutil.rmtree(lora[name].lora_path)
    refused = {}
    for name in ("A", "B"):  # the one evicted is refused (rank 0 cannot read it), the other runs
        try:
            d.add(f"{name}_after", PROMPT, lora[name], max_tokens=6)
        except ValueError as exc:
            refused[name] = str(exc)
        d.run()
    return {"kept": kept, "refused": refused, "outcomes": d.outcomes, "ranks": d.loras_by_rank()}


def test_an_adapter_rank_0_kept_runs_on_every_rank_once_its_directory_is_gone(
    model: Path, tmp_path: Path
) -> None:
    lora = _adapters(tmp_path, "ABC")
    got = run_engine(_kept_adapter_runs, model, lora, delay_s=0.4)
    ids = {lora[n].lora_int_id: n for n in lora}
    kept = [ids[i] for i in got["kept"]]
    assert len(kept) == 2 and kept[1] == "C", kept
    ran, (refused,) = kept[0], {"A", "B"} - {kept[0]}
    assert list(got["refused"]) == [refused] and "is not a directory" in got["refused"][refused]
    out = got["outcomes"]
    assert all(o.finished and o.error is None for o in out.values()), out
    assert out[f"{ran}_after"].tokens == out[f"{ran}_before"].tokens  # its weights on both ranks
    # the adapters change the tokens
    assert len({tuple(out[r].tokens) for r in ("A_before", "B_before", "base")}) == 3
    assert sorted(got["ranks"][0]) == sorted(got["ranks"][1]) == sorted(got["kept"])


# ---- a worker that cannot read an adapter ------------------------------------------------------------------------
def _worker_cannot_read(d: Driver, lora: dict[str, LoRARequest]) -> dict[str, Any]:
    from treadle_model_runner.lora import manager

    read = manager.load_adapter
    # adapter -> rank 0's reads of it until its directory goes (right after that read)
    reads_left = {"D": 2, "E": 1}

    def read_then_delete(request: LoRARequest, *args: Any) -> Any:  # rank 0's reads only
        adapter = read(request, *args)
        left = reads_left[request.lora_name] = reads_left.get(request.lora_name, 0) - 1
        if left == 0:
            shutil.rmtree(request.lora_path)
        return adapter

    manager.load_adapter = read_then_delete  # type: ignore[assignment]
    refused = ""
    try:
        d.add("e", PROMPT, lora["E"], max_tokens=2)  # read on rank 0, gone before the worker reads it
    except ValueError as exc:
        refused = str(exc)
    d.run()
    d.add("b_before", PROMPT, lora["B"], max_tokens=6)
    d.step()  # admitted: it holds B
    d.add("d", PROMPT, lora["D"], max_tokens=4)  # D read on every rank; d waits behind B (max_loras 1)
    d.engine.add_lora(lora["C"])  # evicts D, which nobody holds yet
    d.run()  # d is admitted once b_before ends: D is read again, on rank 0 only
    d.add("b_after", PROMPT, lora["B"], max_tokens=6)
    d.run()
    return {"refused": refused, "outcomes": d.outcomes, "ranks": d.loras_by_rank()}


def test_a_worker_that_cannot_read_an_adapter_fails_its_request_alone(model: Path, tmp_path: Path) -> None:
    lora = _adapters(tmp_path, "BCDE")
    got = run_engine(_worker_cannot_read, model, lora, delay_s=0.1)
    assert "tensor-parallel rank 1 could not read LoRA adapter 'E'" in got["refused"]
    assert "is not a directory" in got["refused"]
    out = got["outcomes"]
    assert out["d"].finished and out["d"].tokens == []
    assert "could not be loaded again for request 'd'" in out["d"].error
    assert "tensor-parallel rank 1 could not read LoRA adapter 'D'" in out["d"].error
    assert out["b_before"].error is None and out["b_after"].error is None
    assert out["b_after"].tokens == out["b_before"].tokens and len(out["b_after"].tokens) == 6
    ids = {n: lora[n].lora_int_id for n in lora}
    assert sorted(got["ranks"][0]) == sorted(got["ranks"][1]) == [ids["B"], ids["C"]]


# ---- a random sequence ------------------------------------------------------------------------------------------
def _random_sequence(d: Driver, lora: dict[str, LoRARequest], stash: Path, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    prompts = [[3 + i, 20 + 5 * i, 7, 50 - i] for i in range(3)]
    want: dict[tuple[int, str | None], list[int]] = {}
    for i, p in enumerate(prompts):  # each prompt under each adapter, while every directory is there
        for name in [None, *lora]:
            d.add(f"ref{i}{name}", p, lora[name] if name else None, max_tokens=4)
            d.run()
            want[i, name] = d.outcomes[f"ref{i}{name}"].tokens
    disagreements: list[tuple[int, list[list[int]]]] = []
    step = 0

    def check() -> None:
        ranks = d.loras_by_rank()
        if sorted(ranks[0]) != sorted(ranks[1]):
            disagreements.append((step, ranks))

    added: dict[str, tuple[int, str | None]] = {}
    for step in range(60):
        op = rng.random()
        name = rng.choice(list(lora))
        path = Path(lora[name].lora_path)
        if op < 0.45:
            i, adapter = rng.randrange(len(prompts)), rng.choice([None, *lora])
            rid = f"r{step}"
            try:
                d.add(rid, prompts[i], lora[adapter] if adapter else None, max_tokens=rng.randint(1, 4))
            except ValueError as exc:
                assert "is not a directory" in str(exc), exc
                continue
            added[rid] = (i, adapter)
        elif op < 0.55 and path.is_dir():
            shutil.move(path, stash / name)  # the adapter's files go away
        elif op < 0.65 and not path.is_dir():
            shutil.move(stash / name, path)  # and come back
        elif op < 0.72:
            try:
                d.engine.add_lora(lora[name])
            except ValueError as exc:
                assert "is not a directory" in str(exc), exc
        elif op < 0.78:
            d.engine.remove_lora(lora[name].lora_int_id)
        for _ in range(rng.randint(0, 3)):
            if d.engine.has_work:
                d.step()
                check()
    d.run(check)
    results = {rid: (added[rid], d.outcomes[rid]) for rid in added}
    return {"want": want, "results": results, "disagreements": disagreements}


@pytest.mark.parametrize("seed", [1, 2])
def test_ranks_hold_the_same_adapters_after_every_step_of_a_random_sequence(
    model: Path, tmp_path: Path, seed: int
) -> None:
    lora = _adapters(tmp_path, "ABCD")
    stash = tmp_path / "stash"
    stash.mkdir()
    got = run_engine(_random_sequence, model, lora, stash, seed, max_cpu_loras=2, delay_s=0.03, seed=seed)
    assert got["disagreements"] == []
    want = got["want"]
    assert len({tuple(t) for t in want.values()}) > len(want) // 2  # adapters change the tokens
    for rid, ((i, adapter), outcome) in got["results"].items():
        assert outcome.finished, rid
        if outcome.error is not None:
            assert adapter is not None and "could not be loaded again" in outcome.error, (rid, outcome.error)
        else:
            assert outcome.tokens == want[i, adapter][: len(outcome.tokens)], rid
    assert len(got["results"]) > 10
