"""The hidden states a Llama-family target hands an EAGLE-3 head (runner/eagle3.py): the residual stream entering
some of its decoder layers, written while the layers run.

`keep_aux(decoder, layers, max_num_tokens)` gives the decoder (models/llama.py's LlamaModel) a persistent buffer
`aux_hidden` [max_num_tokens, len(layers) * hidden]; from then on each forward of T tokens writes the stream entering
layer layers[i] (h + residual; the embeddings before layer 0) into columns [i * hidden, (i + 1) * hidden) of rows
[0, T). The buffer outlives every forward, so a replayed CUDA graph writes it as the eager forward does. A decoder
without `aux_layers` never calls in here: no cost when EAGLE-3 is off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from treadle_model_runner.models.llama import LlamaModel

__all__ = ["keep_aux", "layers_keeping_aux"]


def keep_aux(decoder: LlamaModel, layers: tuple[int, ...], max_num_tokens: int) -> None:
    """From now on every forward of `decoder` (at most `max_num_tokens` tokens) writes the residual streams
    entering `layers` into its `aux_hidden`."""
    weight = decoder.embed_tokens.weight
    width = weight.shape[1]
    decoder.aux_hidden = torch.empty(
        max_num_tokens, len(layers) * width, dtype=weight.dtype, device=weight.device
    )
    decoder.aux_layers = tuple(layers)


def layers_keeping_aux(
    decoder: LlamaModel, h: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`decoder`'s layers over the embeddings `h`, writing the tapped streams (module docstring); returns the last
    layer's (output, residual) as the plain loop does."""
    aux = decoder.aux_hidden
    num_tokens, width = h.shape[0], h.shape[-1]
    assert aux is not None and num_tokens <= aux.shape[0], "keep_aux() sized aux_hidden for fewer tokens"
    residual: torch.Tensor | None = None
    for i, layer in enumerate(decoder.layers):
        for slot, tapped in enumerate(decoder.aux_layers):
            if tapped == i:
                out = aux[:num_tokens, slot * width : (slot + 1) * width]
                if residual is None:
                    out.copy_(h)
                else:
                    torch.add(h, residual, out=out)
        h, residual = layer(h, positions, residual)
    return h, residual
