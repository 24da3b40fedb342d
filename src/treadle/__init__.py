"""treadle: an LLM inference and serving engine.

The meta-package pins the six treadle packages, re-exports the offline API and owns the `treadle` CLI.

    from treadle import LLM, SamplingParams
    out = LLM().generate(["Hello"], SamplingParams(max_tokens=8))
    print(out[0].outputs[0].text)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING, Any

try:
    __version__ = _version("treadle")
except PackageNotFoundError:  # run from a source tree on PYTHONPATH, not installed
    __version__ = "0+source"

if TYPE_CHECKING:
    from treadle_frontend import (
        LLM,
        BeamSearchParams,
        CompletionOutput,
        LoRARequest,
        PoolingParams,
        RequestOutput,
        SamplingParams,
        StructuredOutputsParams,
        TextPrompt,
        TokensPrompt,
    )

__all__ = [
    "LLM",
    "BeamSearchParams",
    "CompletionOutput",
    "LoRARequest",
    "PoolingParams",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputsParams",
    "TextPrompt",
    "TokensPrompt",
    "__version__",
]
_LAZY = tuple(__all__[:-1])


def __getattr__(name: str) -> Any:
    # Lazy: `treadle --version` must not import torch.
    if name in _LAZY:
        import treadle_frontend

        return getattr(treadle_frontend, name)
    raise AttributeError(f"module 'treadle' has no attribute {name!r}")
