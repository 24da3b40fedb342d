"""The meta-package re-exports the offline API: every name in `treadle.__all__` is treadle_frontend's object."""

from __future__ import annotations

import treadle
import treadle_frontend


def test_every_public_name_is_the_frontends() -> None:
    names = [n for n in treadle.__all__ if n != "__version__"]
    assert {"LLM", "SamplingParams", "BeamSearchParams", "LoRARequest", "CompletionOutput"} <= set(names)
    for name in names:
        assert getattr(treadle, name) is getattr(treadle_frontend, name), name
        assert name in treadle_frontend.__all__, name
