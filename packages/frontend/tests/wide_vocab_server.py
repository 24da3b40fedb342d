"""A fake-engine API server over a 49152-token vocabulary (SmolLM2's) with max_logprobs -1, in a process of its own
as `treadle serve` runs (its start-up heap frozen out of the garbage collector's scans, clients elsewhere), for
timing what whole-vocabulary logprobs cost the event loop: `python wide_vocab_server.py PORT TOKENIZER_DIR`."""

from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from fake_engine import FakeAsyncClient, FakeEngine
from frontend_helpers import fake_request, make_engine, make_processor

from treadle_model_runner.outputs import Logprobs


def fast_whole_vocabulary(engine: FakeEngine) -> None:
    """The fake engine's logprobs of 1000 tokens or more from one precomputed ranking: its own would spend ~50 ms
    a token on the event loop, which is not the server's doing (the engine is another process)."""
    rng = random.Random(7)
    ranked = list(range(engine.vocab_size))
    rng.shuffle(ranked)
    values = sorted((-rng.random() * 9 for _ in ranked), reverse=True)
    value_of = dict(zip(ranked, values, strict=True))
    small = engine._logprobs

    def logprobs(rng: random.Random, chosen: int, k: int) -> Logprobs:
        if 0 <= k < 1000:
            return small(rng, chosen, k)
        top = ranked if k == -1 else ranked[:k]
        return Logprobs([chosen, *top], [value_of[chosen], *values[: len(top)]], chosen_rank=3)

    engine._logprobs = logprobs  # type: ignore[method-assign]


def main(port: int, tokenizer_dir: str) -> None:
    import uvicorn

    from treadle_engine_core.heap import freeze_startup_heap
    from treadle_frontend.async_llm import AsyncLLM
    from treadle_frontend.server import ServerConfig, build_app
    from treadle_frontend.tokenizer import load_tokenizer

    tokenizer: Any = load_tokenizer(Path(tokenizer_dir))
    engine = make_engine(tokenizer)
    fast_whole_vocabulary(engine)
    processor = make_processor(tokenizer)
    processor.model = dataclasses.replace(processor.model, max_logprobs=-1)
    llm = AsyncLLM(FakeAsyncClient(engine), processor, request_factory=fake_request)
    app = build_app(llm, ServerConfig(host="127.0.0.1", served_model_name="tiny"))
    freeze_startup_heap("wide-vocabulary test server")
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
