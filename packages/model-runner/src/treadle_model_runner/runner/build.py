"""Building a model with its weights on the runner's device: the target model, and a speculative draft model.

`build_causal_lm` constructs the architecture's module tree in the model dtype on the device (parameters not
initialised: every one is loaded), fills it from the checkpoint (or with deterministic dummy weights), and applies
the quantization plan: a pre-quantized checkpoint's projections get storage in its dtypes first; online fp8
quantizes after the weights are in.
"""

from __future__ import annotations

import logging

import torch

from treadle_model_runner.layers.linear import projections_on_meta
from treadle_model_runner.loader import iterate_weights, load_dummy_weights
from treadle_model_runner.loader.resolve import ResolvedModel
from treadle_model_runner.loader.weights import describe_checkpoint
from treadle_model_runner.models import CausalLM, get_model_class
from treadle_model_runner.parallel import building_expert_parallel
from treadle_model_runner.quantization import (
    allocate_projections,
    checkpoint_weights,
    log_loaded,
    quantize_model,
)
from treadle_model_runner.quantization.plan import QuantizationPlan
from treadle_model_runner.runner.setup import default_dtype, skip_param_init

logger = logging.getLogger(__name__)


def build_causal_lm(
    resolved: ResolvedModel,
    plan: QuantizationPlan | None,
    dtype: torch.dtype,
    device: torch.device,
    max_model_len: int,
    seed: int,
    expert_parallel: bool = False,
) -> CausalLM:
    """The model of `resolved` with its weights, in eval mode with gradients off. `plan`: the quantization plan
    (quantization.resolve_quantization) or None."""
    cls = get_model_class(resolved.hf_config)
    checkpoint = plan.checkpoint if plan is not None else None
    if plan is not None and device.type == "cpu":
        logger.warning("%s", plan.cpu_warning())
    # every parameter is loaded below; an fp8 checkpoint's projections get storage in its dtypes first
    with (
        default_dtype(dtype),
        device,
        skip_param_init(),
        projections_on_meta(checkpoint is not None),
        building_expert_parallel(expert_parallel),
    ):
        model = cls(resolved.hf_config, max_model_len)
    if checkpoint is not None:
        allocate_projections(model, checkpoint, device)
    if resolved.format == "dummy":
        load_dummy_weights(model, seed)
    else:
        # a multimodal checkpoint's language model: its names unprefixed, the vision tower's tensors unread
        names = resolved.multimodal.model_name if resolved.multimodal is not None else None
        weights = iterate_weights(resolved.path, resolved.format, names=names)
        if checkpoint is not None:
            weights = checkpoint_weights(weights, checkpoint, device)
        source = describe_checkpoint(resolved.path)
        if resolved.multimodal is not None:
            source += f" read as {resolved.multimodal.architecture}'s language model (names shown without its prefix)"
        with torch.no_grad():
            model.load_weights(weights, source)
    model.eval().requires_grad_(False)
    if checkpoint is not None:
        log_loaded(model, checkpoint)
    elif plan is not None:  # online: after the weights (dummy ones too) are in
        quantize_model(model, plan.method, plan.dummy_blocks)
    return model
