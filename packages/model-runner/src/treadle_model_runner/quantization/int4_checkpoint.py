"""Loading a 4-bit weight-only checkpoint (AWQ, GPTQ, compressed-tensors W4A16) into treadle's one 4-bit layout.

Steps (ModelRunner.load_model, through checkpoint.py's functions), for a plan whose `checkpoint` is an
`Int4CheckpointScheme`:
1. the model is built with its projections on the meta device, as for fp8 checkpoints;
2. `allocate_projections` gives each `Linear` 4-bit storage (layers/linear_int4.py) when the scheme quantizes every
   HF projection it stacks, the model dtype when it quantizes none (ignored modules), and refuses a stacked layer
   whose shards disagree; a MoE model's routed experts (FusedMoE layers) get 4-bit storage in the stacked expert
   layout, or the model dtype where the scheme leaves them unquantized (int4_experts.py);
3. `layout_weights` passes the checkpoint's other tensors on as they come, gathers each quantized projection's
   tensors (they may lie in different files) and, after the last file, converts them projection by projection
   (int4_formats.py, on the model's device) and hands them on under treadle's names (`q_proj.packed_weight`, ...).
   The gathered tensors are views of the memory-mapped files, so waiting costs no host memory. A 4-bit tensor of a projection that
   config.json leaves unquantized, and a projection missing some of its tensors, are ValueErrors naming the files'
   tensor names;
4. `CausalLM.load_weights` hands each to `load_int4`, which checks its shape against the model and keeps this
   rank's part; a projection missing altogether is named by the model's completeness check.
Dummy weights (`--load-format dummy` with such a config.json) skip steps 3-4: `load_dummy_weights` draws random
codes, scales and zero points for the 4-bit projections (layers/linear_int4.py) and experts (int4_experts.py), so a benchmark runs the 4-bit
kernels on a model of the real shapes without its files.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch

from treadle_model_runner.layers import fp8_weights
from treadle_model_runner.layers.linear import Linear
from treadle_model_runner.layers.linear_int4 import Int4Layout, allocate_int4
from treadle_model_runner.quantization.int4_experts import allocate_experts
from treadle_model_runner.quantization.int4_formats import file_tensors, to_layout
from treadle_model_runner.quantization.int4_scheme import Int4CheckpointScheme
from treadle_model_runner.quantization.online import weight_bytes
from treadle_moe import FusedMoE

logger = logging.getLogger(__name__)

__all__ = ["allocate_projections", "layout_weights", "log_loaded"]


def allocate_projections(model: torch.nn.Module, scheme: Int4CheckpointScheme, device: torch.device) -> None:
    """Storage for every projection of a model built under `projections_on_meta` (step 2 above)."""
    from treadle_model_runner.quantization.checkpoint import projections  # checkpoint.py dispatches here

    layout = Int4Layout(scheme.group_size, has_zeros=not scheme.symmetric, act_order=scheme.act_order)
    for name, layer, quantized in projections(
        model, scheme.quantizes, "4-bit", "quantize all of them or none"
    ):
        if quantized:
            allocate_int4(layer, layout, device, name)
        else:
            fp8_weights.allocate(layer, device, fp8=False, static_input=False)
    allocate_experts(model, scheme, device)


def layout_weights(
    weights: Iterable[tuple[str, torch.Tensor]],
    scheme: Int4CheckpointScheme,
    device: torch.device | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with each 4-bit projection's in treadle's layout (step 3 above), repacked on `device`
    (None: where the files' tensors are, the host)."""
    required, optional = file_tensors(scheme)
    gathered: dict[str, dict[str, torch.Tensor]] = {}  # projection -> its file tensors by short name
    for name, tensor in weights:
        module, _, short = name.rpartition(".")
        if short not in required and short not in optional:
            yield name, tensor
            continue
        if not scheme.quantizes(module):
            raise ValueError(
                f"checkpoint tensor {name!r} is part of a 4-bit projection, but config.json's quantization_config "
                f"leaves {module} unquantized (ignored, not targeted, or the lm_head, which treadle keeps in the "
                "model dtype); treadle cannot load it: fix quantization_config or the files"
            )
        gathered.setdefault(module, {})[short] = tensor
    for module, tensors in gathered.items():
        missing = [f"{module}.{short}" for short in required if short not in tensors]
        if missing:
            raise ValueError(
                f"the checkpoint is missing {', '.join(missing)}: config.json's quantization_config "
                f"({scheme.describe()}) stores each quantized projection as {', '.join(required)}"
            )
        if device is not None:  # the packed tensors are small; unpacking and repacking them is not
            tensors = {short: t.to(device) for short, t in tensors.items()}
        for attr, converted in to_layout(scheme, module, tensors).items():
            yield f"{module}.{attr}", converted


def log_loaded(model: torch.nn.Module, scheme: Int4CheckpointScheme) -> None:
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    int4 = sum(m.packed_weight is not None for m in layers)
    experts = [m for m in model.modules() if isinstance(m, FusedMoE)]
    int4_experts = sum(m.int4_layout is not None for m in experts)
    logger.info(
        "%s: %d projections loaded as 4-bit (ops.w4a16_linear), %d kept in the model dtype (ignored), %d of %d "
        "expert layers 4-bit; embedding, lm_head, router and norms in the model dtype; weights %.1f MiB",
        scheme.describe(), int4, len(layers) - int4, int4_experts, len(experts), weight_bytes(model) / (1 << 20),
    )  # fmt: skip
