"""Paged attention as a layer: the model hands it q, k, v; the backend writes k/v into the paged cache and
attends over everything cached for each request.

The layer owns no weights. Its backend implementation is bound by the runner (`bind_backend`) once the backend
is chosen for the device; the KV-cache tensor and the step's attention metadata come from the forward context,
indexed by `layer_idx`. Shapes: q [T, num_heads * head_size], k / v [T, num_kv_heads * head_size] -> out like q.
A layer may hand over q and k unrotated with their rotary embedding (`rope`): the backend rotates them, and the
Triton backend does it inside its decode kernel together with the cache write (one launch instead of three).
Under a piecewise CUDA-graph capture (runner/piecewise.py) the forward context's `split_attention` takes the call
instead; the runner then calls `attend` on the captured tensors between the graphs' replays.

Attention sinks (gpt-oss): `sinks` [num_heads] is one learned logit per query head (this TP rank's heads) that
joins each softmax's denominator without a value (treadle_kernels.attention.backend). The model owns it as its
own `nn.Parameter` (of this rank's heads) and hands that parameter itself here, not a view of it; the layer holds
it unregistered (so the weight names stay the model's) and passes the same object to the impl, which reads it at
every call. The runner binds after the weights are loaded and the model is placed, and what could come later
keeps the object current: weights copied into it in place, and `Module.to` / `param.data = ...`, which move a
parameter by swapping its storage under the same Parameter object (test_attention_layer_sinks.py holds torch to
that). A view would not follow such a move, and a Parameter object replaced after `bind_backend` would leave the
impl a stale tensor; no loader does either.

Shared key/value (`shares_kv`, DeepSeek's multi-head latent attention: models/deepseek_mla.py): the model hands the
same vector as key and value (num_kv_heads 1); the runner gives the layer one cache tensor that the backend sees
as both K and V (kv_cache.py), and only backends with `supports_shared_kv` can run it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from treadle_kernels.attention import Rope
from treadle_model_runner.forward_context import get_forward_context


class Attention(nn.Module):
    sinks: torch.Tensor | None  # the model's sink logits (module docstring), or None

    def __init__(
        self,
        layer_idx: int,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        sinks: torch.Tensor | None = None,  # [num_heads] the model's sink logits parameter (module docstring)
        # key and value are one vector, cached once (module docstring)
        shares_kv: bool = False,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        # a plain attribute, so an nn.Parameter is not registered as this module's own (nn.Module.__setattr__)
        self.__dict__["sinks"] = sinks
        self.shares_kv = shares_kv
        self.impl: Any = None

    def bind_backend(self, backend: Any) -> None:
        """Create this layer's implementation from an attention backend class (after the weights are loaded)."""
        if self.sinks is not None and not getattr(backend, "supports_sinks", False):
            raise ValueError(
                f"attention backend '{backend.name}' does not support attention sinks (gpt-oss); "
                "use --attention-backend triton or torch."
            )
        if self.shares_kv and not getattr(backend, "supports_shared_kv", False):
            raise ValueError(refuse_shared_kv_message(backend.name))
        self.impl = backend.get_impl_cls()(
            self.num_heads,
            self.head_size,
            self.scale,
            self.num_kv_heads,
            sliding_window=self.sliding_window,
            logits_soft_cap=self.logits_soft_cap,
            # only with sinks: an impl of a backend without them need not know the argument
            **({} if self.sinks is None else {"sinks": self.sinks}),
        )

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rope: Rope | None = None
    ) -> torch.Tensor:
        """Attend; with ``rope``, q and k arrive unrotated and the backend rotates them (perhaps fused into its
        kernels, so q and k may be left unrotated or rotated afterwards)."""
        ctx = get_forward_context()
        if ctx.split_attention is not None:  # piecewise CUDA-graph capture: attention runs between the pieces
            return ctx.split_attention(self, query, key, value, rope)
        output = query.new_empty(query.shape[0], self.num_heads * self.head_size)
        self.attend(query, key, value, rope, output)
        return output

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        rope: Rope | None,
        output: torch.Tensor,  # [T, num_heads * head_size], written in place
    ) -> None:
        """Run the backend on the forward context's KV cache and metadata for this layer."""
        assert self.impl is not None, (
            f"attention layer {self.layer_idx} has no backend: call bind_backend first"
        )
        ctx = get_forward_context()
        num_tokens = query.shape[0]
        args = (
            query.view(num_tokens, self.num_heads, self.head_size),
            key.view(num_tokens, self.num_kv_heads, self.head_size),
            value.view(num_tokens, self.num_kv_heads, self.head_size),
            ctx.kv_caches[self.layer_idx],
            ctx.attn_metadata[self.layer_idx],
            output.view(num_tokens, self.num_heads, self.head_size),
        )
        if rope is None:
            self.impl.forward(*args)
        else:
            self.impl.forward_rope(rope, *args)


def refuse_shared_kv_message(backend_name: str) -> str:
    """Why a backend without `supports_shared_kv` cannot run multi-head latent attention, and what to use."""
    return (
        f"attention backend '{backend_name}' cannot run multi-head latent attention (DeepSeek-V2/V3 MLA: one latent "
        "vector per token, e.g. 576 wide, serves as the key and the value of every head; FlashInfer's paged "
        "wrappers take neither that head size nor a shared key/value cache); use --attention-backend triton "
        "(the CUDA default) or torch."
    )
