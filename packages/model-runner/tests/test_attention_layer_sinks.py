"""The attention layer's sinks (gpt-oss): the model owns the parameter, the layer hands that same tensor to its
backend implementation, and what may happen to a model's parameters after binding (weights loaded in place,
`Module.to`, `param.data = ...`) keeps the impl reading the current values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from treadle_kernels.attention import AttentionBackend, get_attn_backend
from treadle_model_runner.layers.attention import Attention


class SinkAttention(nn.Module):
    """A model's attention module as gpt-oss's is written: it registers the sinks and passes them to the layer."""

    def __init__(self, num_heads: int = 4, num_kv_heads: int = 2) -> None:
        super().__init__()
        self.sinks = nn.Parameter(torch.zeros(num_heads))
        self.attn = Attention(0, num_heads, 16, 0.25, num_kv_heads, sliding_window=8, sinks=self.sinks)


def test_sinks_stay_the_models_parameter():
    module = SinkAttention()
    assert [name for name, _ in module.named_parameters()] == ["sinks"]
    assert list(module.state_dict()) == ["sinks"]
    assert list(module.attn.state_dict()) == [], "the layer must not register the sinks as its own"
    assert module.attn.sinks is module.sinks


def test_impl_follows_the_parameter_after_binding():
    module = SinkAttention()
    module.attn.bind_backend(get_attn_backend("torch", "cpu"))
    impl = module.attn.impl
    assert impl.sinks is module.sinks
    loaded = torch.randn(4)
    module.load_state_dict({"sinks": loaded})  # weights copied in place
    torch.testing.assert_close(impl.sinks.detach(), loaded)
    module.to(torch.float64)  # a move swaps the storage under the same Parameter object
    assert impl.sinks.dtype == torch.float64 and impl.sinks is module.sinks
    with torch.no_grad():
        module.sinks.data = torch.full((4,), 3.0, dtype=torch.float64)
    torch.testing.assert_close(impl.sinks.detach(), torch.full((4,), 3.0, dtype=torch.float64))


def test_backend_without_sinks_refuses_the_layer():
    from treadle_kernels.attention.flashinfer_backend import FlashInferAttentionBackend

    with pytest.raises(ValueError, match=r"'flashinfer' does not support attention sinks.*triton or torch"):
        SinkAttention().attn.bind_backend(FlashInferAttentionBackend)

    class Other(AttentionBackend):  # a third-party backend that never heard of sinks
        name = "other"

    with pytest.raises(ValueError, match=r"'other' does not support attention sinks"):
        SinkAttention().attn.bind_backend(Other)
    plain = Attention(0, 4, 16, 0.25, 2)
    plain.bind_backend(Other)  # without sinks, as before
    assert plain.impl.sinks is None


def test_bad_sinks_shape_is_reported():
    layer = Attention(0, 4, 16, 0.25, 2, sinks=torch.zeros(8))
    with pytest.raises(ValueError, match=r"num_heads \(4\)"):
        layer.bind_backend(get_attn_backend("torch", "cpu"))
