"""vLLM's `PoolingParams`: the per-call options of `LLM.embed` and `LLM.score`.

`normalize` overrides the engine's `pooler_config.normalize` for these prompts (None: the engine's);
`truncate_prompt_tokens` keeps each prompt's last N tokens (-1: the last max_model_len; None: all), as the
`/v1/embeddings` field of that name does. `dimensions` (Matryoshka embeddings) is refused, as on the server: the
decoder models served have no Matryoshka training, so a cut vector would not be an embedding.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PoolingParams:
    normalize: bool | None = None
    dimensions: int | None = None
    truncate_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true, false or None, got {self.normalize!r}")
        if self.dimensions is not None:
            raise ValueError(
                f"dimensions {self.dimensions!r} is not supported: the served models have no Matryoshka training, "
                "so a cut vector would not be an embedding"
            )
        check_truncate(self.truncate_prompt_tokens)


def check_truncate(keep: int | None) -> None:
    """`truncate_prompt_tokens` is None, -1 or >= 1 (ValueError otherwise)."""
    if keep is not None and (
        isinstance(keep, bool) or not isinstance(keep, int) or (keep != -1 and keep < 1)
    ):
        raise ValueError(f"truncate_prompt_tokens must be -1 or >= 1, got {keep!r}")
