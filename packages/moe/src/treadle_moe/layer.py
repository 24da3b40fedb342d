"""FusedMoE: the MoE block of a transformer layer, assembled from router + modular kernel.

    topk_weights, topk_ids = router(router_logits)                  # [T, top_k] float32 / int32
    out = kernel(hidden, w13_weight, w2_weight, topk_weights, topk_ids)   # prepare -> experts -> finalize

Weight layout (what checkpoints are loaded into):
- `w13_weight` [E, 2N, K]: for expert e, rows 0..N-1 are the gate projection (HF `gate_proj`, Mixtral `w1`),
  rows N..2N-1 the up projection (HF `up_proj`, Mixtral `w3`). Same as transformers' fused `gate_up_proj`.
- `w2_weight` [E, K, N]: the down projection (HF `down_proj`, Mixtral `w2`). Same as transformers' `down_proj`.
  K = hidden_size, N = moe intermediate size, E = num_experts.
The router's gate (a [E, K] linear layer) stays in the model; forward takes its logits.
Expert biases (gpt-oss, `bias=True`; expert_bias.py): `w13_bias` [E, 2N] (gate's, then up's, like w13's rows) and
`w2_bias` [E, K], loaded through `weight_loader` like the weights; an expert computes
`act(x @ w13[e].T + w13_bias[e]) @ w2[e].T + w2_bias[e]`, which the routing weight then scales (the down bias too).
A tensor-parallel subclass adds w2_bias on one rank only (`adds_w2_bias`). `activation="swigluoai"` is gpt-oss's
clamped SwiGLU with `swiglu_alpha` / `swiglu_limit` (activation.py). Both need model-dtype or MXFP4 experts: fp8
and 4-bit ones are refused for such a layer.
Expert parallelism (`placement`, treadle_moe/placement.py): the layer holds only its rank's experts, w13 / w2 (and
the weight scales) [E_local, ...]; the router still routes over all E, forward maps the ids to local ones (-1 for
another rank's expert, whose slots the kernel skips) and returns this rank's share of the sum. Loaders keep taking
global expert ids and ignore other ranks' experts; static fp8 input scales are kept for every expert, so their
fold is the same on every rank.

fp8 experts (experts/fp8.py; done by fp8_layer.py): `quantize_fp8(layout)` turns loaded model-dtype weights into
float8_e4m3fn with scales (per channel: online `quantization="fp8"`; block-wise: dummy weights for a block-wise
checkpoint's config), and
`allocate_fp8(layout)` gives an fp8 checkpoint's experts their storage, which the loader then fills: weights through
`weight_loader` as always, scales through it too (`w13_weight_scale`: gate rows or block rows, then up ones;
`w2_weight_scale`). Either way `fp8_layout` is set and the forward hands the scales to the kernel. A layout with
static activations also gets the checkpoint's per-expert input scales (`w13_input_scale` [E, 2]: gate's, up's;
`w2_input_scale` [E]), folded to one per GEMM by `fp8_scales` (the loader calls it at load; else the next forward does:
`fold_input_scales`, the maximum, with a warning when they differ); loading an input scale again unfolds them.
4-bit experts (W4A16 checkpoints, experts/int4.py; storage and loading in int4_layer.py): `w13_weight` / `w2_weight`
become packed int32 [E, K / 8, 2N] / [E, N / 8, K] beside `w{13,2}_group_scale`, `_group_zero` and `_group_index`;
`int4_layout` is set and the forward hands them to the kernel (`int4_scales`).
MXFP4 experts (gpt-oss's released format, experts/mxfp4.py; storage, loading and quantizing in mxfp4_layer.py):
`w13_weight` / `w2_weight` become uint8 blocks [E, 2N, K / 32, 16] / [E, K, N / 32, 16] beside e8m0 scales
`w13_weight_scale` / `w2_weight_scale`; `mxfp4_layout` is set; biases and swigluoai run with them.

The kernel is chosen by the oracle at the first forward on each (device, dtype), since a model is often built
on one device and moved; the decision is logged once and readable through `describe()`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from treadle_moe import fp8_layer
from treadle_moe.activation import SWIGLU_ALPHA, SWIGLU_LIMIT, check_activation
from treadle_moe.expert_bias import allocate_biases, describe_epilogue, layer_epilogue
from treadle_moe.expert_weights import copy_expert_weight
from treadle_moe.experts.fp8 import Fp8ExpertScales, Fp8Layout
from treadle_moe.experts.int4 import Int4ExpertScales, Int4Layout
from treadle_moe.experts.mxfp4 import Mxfp4Layout
from treadle_moe.modular_kernel import ModularKernel
from treadle_moe.mxfp4_layer import mxfp4_scales
from treadle_moe.oracle import MoEKernelChoice, MoEProblem, select_moe_kernel
from treadle_moe.placement import ExpertPlacement
from treadle_moe.router import RouterConfig, Scoring

logger = logging.getLogger(__name__)

# the tensors beside 4-bit experts' packed weights (int4_layer.py)
INT4_PARAMS = tuple(f"{w}_group_{t}" for w in ("w13", "w2") for t in ("scale", "zero", "index"))
# where a forward runs, and the weights' fp8, 4-bit or MXFP4 layout
_KernelKey = tuple[torch.device, torch.dtype, Fp8Layout | None, Int4Layout | None, Mxfp4Layout | None]


class FusedMoE(nn.Module):
    """Routed experts of one layer: forward(hidden [T, K], router_logits [T, E]) -> [T, K]."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        activation: str = "silu",
        scoring: Scoring = "softmax",
        num_expert_group: int | None = None,
        topk_group: int | None = None,
        routed_scaling_factor: float = 1.0,
        use_correction_bias: bool = False,
        shared_experts: nn.Module | None = None,
        backend: str | None = None,
        max_num_tokens: int = 8192,
        placement: ExpertPlacement | None = None,
        swiglu_alpha: float = SWIGLU_ALPHA,
        swiglu_limit: float = SWIGLU_LIMIT,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if placement is not None and placement.num_experts != num_experts:
            raise ValueError(
                f"the placement covers {placement.num_experts} experts, the layer has {num_experts}"
            )
        # the experts this layer holds (expert parallelism: a range of them; else all)
        self.placement = placement or ExpertPlacement.linear(num_experts)
        num_local = self.placement.num_local
        check_activation(activation)
        self.router = RouterConfig(
            num_experts=num_experts,
            top_k=top_k,
            renormalize=renormalize,
            scoring=scoring,
            num_expert_group=num_expert_group,
            topk_group=topk_group,
            routed_scaling_factor=routed_scaling_factor,
        )
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.activation = activation
        self.swiglu_alpha, self.swiglu_limit = swiglu_alpha, swiglu_limit  # swigluoai's constants
        self.backend = backend
        self.max_num_tokens = max_num_tokens
        # [E_local, 2N, K]: gate rows then up rows per expert
        self.w13_weight = nn.Parameter(
            torch.empty(num_local, 2 * intermediate_size, hidden_size, dtype=dtype, device=device),
            requires_grad=False,
        )
        # [E_local, K, N]
        self.w2_weight = nn.Parameter(
            torch.empty(num_local, hidden_size, intermediate_size, dtype=dtype, device=device),
            requires_grad=False,
        )
        self.w13_weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        self.w2_weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        # gpt-oss: [E_local, 2N] gate's then up's bias, [E_local, K] (expert_bias.py); None: no biases
        self.w13_bias: nn.Parameter | None = None
        self.w2_bias: nn.Parameter | None = None
        if bias:
            allocate_biases(self, dtype, device)
        self.e_score_correction_bias: nn.Parameter | None = None
        if use_correction_bias:  # DeepSeek-V3: selection bias [E], float32
            correction = torch.zeros(num_experts, dtype=torch.float32, device=device)
            self.e_score_correction_bias = nn.Parameter(correction, requires_grad=False)
        self.shared_experts = shared_experts
        # fp8 experts (module docstring): the scales' layout and the fp32 scales; None: model-dtype weights
        self.fp8_layout: Fp8Layout | None = None
        self.w13_weight_scale: nn.Parameter | None = None
        self.w2_weight_scale: nn.Parameter | None = None
        # static activations: the checkpoint's input scales per expert, and their fold (None until the next forward)
        self.w13_input_scale: nn.Parameter | None = None
        self.w2_input_scale: nn.Parameter | None = None
        self._folded_input_scales: tuple[torch.Tensor, torch.Tensor] | None = None
        # 4-bit experts (module docstring): the layout; the tensors are registered by int4_layer.allocate_int4
        self.int4_layout: Int4Layout | None = None
        self.int4_index_from: dict[int, str] = {}  # expert -> the shard (w1 / w3) whose w13 g_idx it holds
        # MXFP4 experts (module docstring): set by mxfp4_layer.py, the scales in w13_weight_scale / w2_weight_scale
        self.mxfp4_layout: Mxfp4Layout | None = None
        self._kernels: dict[_KernelKey, tuple[MoEKernelChoice, ModularKernel]] = {}
        self._last_key: _KernelKey | None = None

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """hidden [T, K] (or [..., K]), router_logits [T, E] -> [T, K] (same leading shape as hidden)."""
        shape = hidden.shape
        hidden = hidden.reshape(-1, self.hidden_size)
        router_logits = router_logits.reshape(-1, self.num_experts)
        if router_logits.shape[0] != hidden.shape[0]:
            raise ValueError(
                f"router_logits has {router_logits.shape[0]} tokens but hidden has {hidden.shape[0]}; "
                "pass the gate's logits for the same tokens"
            )
        topk_weights, topk_ids = self.router.select(router_logits, self.e_score_correction_bias)
        local_ids = self.placement.to_local_ids(topk_ids)  # -1: another rank's expert
        kernel = self._kernel_for(hidden)
        out = kernel(hidden, self.w13_weight, self.w2_weight, topk_weights, local_ids, self.activation,
                     self.fp8_scales(), self.int4_scales(), layer_epilogue(self), mxfp4_scales(self))  # fmt: skip
        return out.view(shape)

    def fp8_scales(self) -> Fp8ExpertScales | None:
        """The fp8 experts' scales for the kernel (a static layout's input scales folded); None for model-dtype
        weights (fp8_layer.py)."""
        return fp8_layer.fp8_scales(self)

    def adds_w2_bias(self) -> bool:
        """Whether this layer adds w2_bias to its output: a tensor-parallel subclass, whose ranks' outputs are
        summed, answers True on one rank only."""
        return True

    def int4_scales(self) -> Int4ExpertScales | None:
        """The 4-bit experts' scales, zero points and g_idx for the kernel; None unless 4-bit."""
        if self.int4_layout is None:
            return None
        t: dict[str, torch.Tensor | None] = {name: getattr(self, name, None) for name in INT4_PARAMS}
        s13, s2 = t["w13_group_scale"], t["w2_group_scale"]
        assert s13 is not None and s2 is not None, "4-bit experts have scales"
        return Int4ExpertScales(s13, s2, t["w13_group_zero"], t["w2_group_zero"], t["w13_group_index"],
                                t["w2_group_index"], self.int4_layout)  # fmt: skip

    def _kernel_for(self, hidden: torch.Tensor) -> ModularKernel:
        key = (hidden.device, hidden.dtype, self.fp8_layout, self.int4_layout, self.mxfp4_layout)
        entry = self._kernels.get(key)
        if entry is None:
            problem = MoEProblem(
                num_experts=self.placement.num_local,
                top_k=self.top_k,
                hidden_size=self.hidden_size,
                intermediate_size=self.intermediate_size,
                dtype=hidden.dtype,
                device=hidden.device,
                max_num_tokens=self.max_num_tokens,
                activation=self.activation,
                fp8=self.fp8_layout,
                int4=self.int4_layout,
                mxfp4=self.mxfp4_layout,
                has_bias=self.w13_bias is not None,
                routed_experts=self.num_experts if self.placement.is_partial else None,
            )
            choice = select_moe_kernel(problem, self.backend)
            entry = (choice, choice.build(self.shared_experts))
            self._kernels[key] = entry
        self._last_key = key
        return entry[1]

    def describe(self) -> str:
        """The oracle's choice (and reasons) for the last forward; before any forward, what CPU would pick."""
        if self._last_key is None:
            return "moe: not run yet (the kernel is chosen at the first forward on each device and dtype)"
        return self._kernels[self._last_key][0].describe()

    # ---- weight loading -------------------------------------------------------------------------------------

    def weight_loader(
        self,
        param: nn.Parameter,
        loaded_weight: torch.Tensor,
        weight_name: str,
        shard_id: str,
        expert_id: int,
    ) -> None:
        """vLLM-style loader: copy one expert's gate ("w1"), up ("w3") or down ("w2") matrix into `param`
        (expert_weights.py). `expert_id` is global: an expert another rank holds (expert parallelism) is ignored."""
        if param is self.w13_input_scale or param is self.w2_input_scale:
            self._folded_input_scales = None  # folded again by the next fp8_scales()
        copy_expert_weight(self, param, loaded_weight, weight_name, shard_id, expert_id)

    def load_expert_weight(self, expert_id: int, shard_id: str, weight: torch.Tensor) -> None:
        """Per-expert checkpoint tensor: "w1" gate [N, K], "w3" up [N, K], "w2" down [K, N]."""
        param = self.w2_weight if shard_id == "w2" else self.w13_weight
        self.weight_loader(param, weight, f"expert {expert_id} {shard_id}", shard_id, expert_id)

    def load_stacked_weights(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """transformers' fused layout: gate_up_proj [E, 2N, K] (gate first), down_proj [E, K, N] (every expert;
        this layer keeps its own)."""
        if self.fp8_layout is not None or self.int4_layout is not None or self.mxfp4_layout is not None:
            raise ValueError("fp8, 4-bit and MXFP4 experts load their matrices with their scales")
        for name, param, weight in (
            ("gate_up_proj", self.w13_weight, gate_up),
            ("down_proj", self.w2_weight, down),
        ):
            full = (self.num_experts, *param.shape[1:])
            if tuple(weight.shape) != full:
                raise ValueError(f"{name} has shape {tuple(weight.shape)}, expected {full}")
            param.data.copy_(weight.narrow(0, self.placement.first, self.placement.num_local))

    # ---- fp8 experts ----------------------------------------------------------------------------------------

    def quantize_fp8(self, layout: Fp8Layout) -> None:
        """Replace the loaded model-dtype experts by float8_e4m3fn in `layout` (fp8_layer.py)."""
        fp8_layer.quantize_fp8(self, layout)

    def allocate_fp8(self, layout: Fp8Layout, device: torch.device | str | None = None) -> None:
        """Storage for an fp8 checkpoint's experts in `layout`, to be filled by `weight_loader` (fp8_layer.py)."""
        fp8_layer.allocate_fp8(self, layout, device)

    def allocate(self, device: torch.device | str | None = None) -> None:
        """Model-dtype storage for experts built on the meta device, to be filled by `weight_loader`."""
        self.w13_weight = self._parameter(torch.empty_like(self.w13_weight, device=device))
        self.w2_weight = self._parameter(torch.empty_like(self.w2_weight, device=device))
        if self.w13_bias is not None:
            allocate_biases(self, self.w13_weight.dtype, device)

    def w2_row_amax(self, local: torch.Tensor) -> torch.Tensor:
        """[E, K] largest magnitudes of the w2 rows this layer holds -> of the whole rows (a tensor-parallel layer
        holds a slice of each row's columns and takes the maximum over its ranks)."""
        return local

    def _parameter(self, t: torch.Tensor) -> nn.Parameter:
        param = nn.Parameter(t, requires_grad=False)
        param.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        return param

    @staticmethod
    def make_expert_params_mapping(
        num_experts: int,
        gate_proj_name: str = "gate_proj",
        down_proj_name: str = "down_proj",
        up_proj_name: str = "up_proj",
    ) -> list[tuple[str, str, int, str]]:
        """(param name, checkpoint name fragment, expert id, shard id) for every expert weight.

        Qwen3-MoE: `experts.{e}.gate_proj.` / `up_proj.` / `down_proj.`; Mixtral: pass "w1", "w2", "w3".
        """
        mapping = []
        for expert in range(num_experts):
            for ckpt_name, shard in ((gate_proj_name, "w1"), (up_proj_name, "w3"), (down_proj_name, "w2")):
                param = "experts.w2_weight" if shard == "w2" else "experts.w13_weight"
                mapping.append((param, f"experts.{expert}.{ckpt_name}.", expert, shard))
        return mapping

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, renormalize={self.router.renormalize}, "
            f"scoring={self.router.scoring}, activation={self.activation}"
            + describe_epilogue(self)
            + (f", local_experts={self.placement.local_experts}" if self.placement.is_partial else "")
            + (f", fp8={self.fp8_layout.describe()}" if self.fp8_layout is not None else "")
            + (f", int4={self.int4_layout.describe()}" if self.int4_layout is not None else "")
            + (f", {self.mxfp4_layout.describe()}" if self.mxfp4_layout is not None else "")
        )
