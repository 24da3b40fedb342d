"""ModelRunner: a SchedulerOutput in, a ModelRunnerOutput out, on one device.

    runner = ModelRunner(model_config, cache_config, max_num_seqs, max_num_batched_tokens)
    runner.load_model(); kv_config = runner.initialize_kv_cache()
    output = runner.execute(scheduler_output)          # every engine step

A step: apply the scheduler's diff to the persistent state (`state.py`), build the flat inputs with vectorized
code (`inputs.py`; the T-sized ones on the device, `device_inputs.py`), run the model (eagerly, or by replaying
a CUDA graph for a decode-only batch; other steps of up to 512 tokens replay a whole graph where the attention
backend allows it, else piecewise graphs around eager attention; `graphs.py` captures them), compute logits only
where a token is sampled (and at prompt positions asked for prompt logprobs), sample, and append the sampled
tokens to the persistent batch so the next decode step needs nothing from the scheduler but counts. A step may
verify draft tokens (speculative decoding, spec_decode.py): such requests schedule several tokens, so the step
replays a verify graph (batch_graphs.py) or takes the mixed-batch path, and is never deferred.
Under async scheduling (`async_output`) a step that needs no host tokens returns before its sampled tokens
reach the host: placeholders hold their places and the next step reads them on the device (`pending.py`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from treadle_kernels.attention import get_attn_backend
from treadle_model_runner.config import CacheConfig, LoRAConfig, ModelConfig, SpeculativeConfig
from treadle_model_runner.forward_context import ForwardContext
from treadle_model_runner.kv_cache import resolve_kv_cache_dtype
from treadle_model_runner.kv_cache_spec import KVCacheConfig
from treadle_model_runner.layers.attention import Attention
from treadle_model_runner.loader import resolve_model
from treadle_model_runner.loader.weights import CONFIG_FILE
from treadle_model_runner.lora.manager import LoRAManager
from treadle_model_runner.lora.request import LoRARequest
from treadle_model_runner.models import CausalLM, get_model_class
from treadle_model_runner.outputs import AsyncModelRunnerOutput, ModelRunnerOutput
from treadle_model_runner.parallel import get_tp, prepare_small_all_reduce
from treadle_model_runner.quantization import resolve_quantization
from treadle_model_runner.runner.batch_graphs import MixedGraphs, VerifyGraphs
from treadle_model_runner.runner.build import build_causal_lm
from treadle_model_runner.runner.cuda_graph import GraphSet
from treadle_model_runner.runner.describe import log_dispatch_report, log_expert_parallel, runtime_summary
from treadle_model_runner.runner.device_inputs import StepBuffers
from treadle_model_runner.runner.draft_model import DraftModel
from treadle_model_runner.runner.eagle3 import load_drafter
from treadle_model_runner.runner.graphs import batch_plan, forward_step, padded_size
from treadle_model_runner.runner.input_batch import InputBatch
from treadle_model_runner.runner.inputs import StepInputs, prepare_inputs
from treadle_model_runner.runner.kv_setup import initialize_kv_cache
from treadle_model_runner.runner.pending import PendingTokens, TokenCopier, device_source, resolve
from treadle_model_runner.runner.sampling import sample_step
from treadle_model_runner.runner.setup import (
    check_backend_fits_model,
    check_model_features,
    check_runner_args,
    eos_token_ids,
    resolve_device,
    resolve_dtype,
    resolve_max_model_len,
    start_device_init,
)
from treadle_model_runner.runner.spec_decode import stage_drafts
from treadle_model_runner.runner.state import apply_scheduler_output
from treadle_model_runner.runner.structured import StructuredOutputs
from treadle_model_runner.sample import Sampler
from treadle_model_runner.scheduler_output import SchedulerOutput
from treadle_model_runner.structured_outputs import StructuredOutputsParams

logger = logging.getLogger(__name__)


class ModelRunner:
    # the step state, set by initialize_kv_cache (kv_setup.py)
    batch: InputBatch
    buffers: StepBuffers
    builders: list[Any]
    layer_to_group: list[int]

    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        device: torch.device | str | None = None,
        lora_config: LoRAConfig | None = None,
        speculative_config: SpeculativeConfig | None = None,
    ) -> None:
        """`lora_config`: serve LoRA adapters when its enable_lora is set (lora/manager.py). `speculative_config`:
        steps may verify up to its num_speculative_tokens drafts a request (spec_decode.py), so the memory profile
        samples that many more logits rows."""
        self.lora_config = lora_config if lora_config is not None and lora_config.enable_lora else None
        check_runner_args(
            model_config, max_num_seqs, max_num_batched_tokens, self.lora_config, speculative_config
        )
        self.model_config = model_config
        self.cache_config = cache_config
        self.lora: LoRAManager | None = None  # the adapters, once the model is loaded
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_speculative_tokens = speculative_config.num_speculative_tokens if speculative_config else 0
        self.speculative_config = speculative_config
        self.drafter: DraftModel | None = None  # speculative_config method draft_model or eagle3, once loaded
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(model_config.dtype, self.device)
        start = time.perf_counter()
        device_init = start_device_init(self.device)
        self.resolved = resolve_model(model_config)
        config_s = time.perf_counter() - start
        if device_init is not None:
            device_init.join()
            logger.info("model config read in %.1f s; device %s ready after %.1f s (alongside)", config_s,
                        self.device, time.perf_counter() - start)  # fmt: skip
        self._max_model_len = resolve_max_model_len(model_config.max_model_len, self.resolved.hf_config)
        self._eos_token_ids = eos_token_ids(self.resolved.hf_config, self.resolved.path)
        # None, online quantization, or an fp8 checkpoint's own layout (quantization/plan.py)
        self.quantization = resolve_quantization(
            model_config.quantization, self.hf_config, get_model_class(self.hf_config),
            self.resolved.path / CONFIG_FILE, self.resolved.format,
        )  # fmt: skip
        backend_name = None if model_config.attention_backend == "auto" else model_config.attention_backend
        self.attn_backend: Any = get_attn_backend(backend_name, self.device)
        check_backend_fits_model(self.attn_backend, get_model_class(self.hf_config))
        check_model_features(
            get_model_class(self.hf_config),
            None if self.quantization is None else self.quantization.method,
            self.lora_config is not None,
        )
        self.kv_cache_dtype = resolve_kv_cache_dtype(
            cache_config.kv_cache_dtype, self.dtype, self.attn_backend
        )
        self.sampler = Sampler()
        tokenizer = (
            Path(model_config.tokenizer).expanduser() if model_config.tokenizer else self.resolved.path
        )
        self.structured = StructuredOutputs(tokenizer, self.vocab_size, self._eos_token_ids)
        self.generator = torch.Generator(device=self.device).manual_seed(model_config.seed)
        self.model: CausalLM | None = None
        self.kv_caches: list[torch.Tensor] = []
        self.kv_cache_config: KVCacheConfig | None = None
        self.requests: dict[str, Any] = {}  # request id -> RequestState (live requests, scheduled or not)
        # decode-only steps (cuda_graph.py); with LoRA each set is two variants, with and without adapters
        # (lora_graphs.py)
        self.graphs: GraphSet | None = None
        self.piecewise: GraphSet | None = None  # steps that are not decode-only (piecewise.py)
        self.prefill_graphs: GraphSet | None = None  # such steps with one request (prefill_graphs.py)
        # steps of several requests that are not decode-only (batch_graphs.py): verifying drafts, and the rest
        self.verify_graphs: VerifyGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        self.graph_bytes_reserved = 0  # device memory left free for the CUDA graphs when sizing the KV cache
        # async output (set by the engine under async scheduling): return before the sampled tokens reach the
        # host; `pending` holds the steps whose tokens the host has not written yet (pending.py)
        self.async_output = False
        self.copier = TokenCopier(self.device)
        self.pending: list[PendingTokens] = []
        logger.info(
            "model runner: %s on %s, dtype %s, KV cache %s, max_model_len %d, max_num_seqs %d, "
            "max_num_batched_tokens %d", self.resolved.path, self.device, self.dtype, self.kv_cache_dtype,
            self._max_model_len, max_num_seqs, max_num_batched_tokens,
        )  # fmt: skip

    # ---- properties the engine reads ---------------------------------------------------------------
    @property
    def hf_config(self) -> Any:
        return self.resolved.hf_config

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self._eos_token_ids)

    def check_structured_outputs(self, params: StructuredOutputsParams) -> None:
        """Compile (and cache) a request's grammar before it is queued: ValueError when it cannot run."""
        self.structured.compile(params)

    # ---- LoRA adapters (vLLM's add_lora / remove_lora / list_loras) -------------------------------
    def add_lora(self, request: LoRARequest, load_inplace: bool = False) -> bool:
        """Load and check an adapter into the host cache before a request uses it: ValueError when it cannot run.
        `load_inplace`: read it again from its path and replace the weights under its id (running requests use
        the new weights from their next step on)."""
        self._require_lora().add(request, replace=load_inplace)
        return True

    def hold_lora(self, request_id: str, request: LoRARequest) -> None:
        """The scheduler admits `request_id`, which runs `request`'s adapter: keep it in host memory until the
        request finishes or is preempted, loading it again if it was evicted (ValueError: fail that request)."""
        self._require_lora().hold(request_id, request)

    def remove_lora(self, lora_id: int) -> bool:
        return self._require_lora().remove(lora_id)

    def list_loras(self) -> list[int]:
        return self._require_lora().list_loras() if self.lora is not None else []

    def _require_lora(self) -> LoRAManager:
        if self.lora is None:
            raise ValueError("LoRA is not enabled: start the engine with enable_lora=True (--enable-lora)")
        return self.lora

    # ---- startup ------------------------------------------------------------------------------------
    def load_model(self) -> None:
        model = build_causal_lm(
            self.resolved, self.quantization, self.dtype, self.device, self._max_model_len,
            self.model_config.seed, self.model_config.enable_expert_parallel,
        )  # fmt: skip
        if self.lora_config is not None:
            num_tokens = max(self.max_num_batched_tokens, self.max_num_seqs)
            self.lora = LoRAManager(model, self.lora_config, num_tokens, self.dtype, self.device)
        for layer in model.attention_layers():
            layer.bind_backend(self.attn_backend)
        self.model = model
        self.drafter = load_drafter(self, self.speculative_config)  # a draft model or an EAGLE-3 head
        prepare_small_all_reduce(self.dtype, self.device)  # tensor parallel on CUDA: every rank, here
        logger.info("loaded %s (%s)", type(model).__name__, self.resolved.format)
        log_dispatch_report(model)
        log_expert_parallel(model, self.model_config.enable_expert_parallel, get_tp().size)

    def kv_layers(self) -> list[Attention]:
        """Every attention layer with a KV cache, by layer_idx: the target's, then the draft model's."""
        layers = self._require_model().attention_layers()
        return layers + self.drafter.layers if self.drafter is not None else layers

    def initialize_kv_cache(self) -> KVCacheConfig:
        """Size the paged KV cache from memory, allocate it, and capture CUDA graphs (kv_setup.py)."""
        return initialize_kv_cache(self)

    def describe(self) -> dict[str, str]:
        """Device, dtypes, attention backend, CUDA-graph mode, dummy or real weights (runner/describe.py)."""
        return runtime_summary(self)

    def release_graphs(self) -> None:
        """Free every CUDA graph (decode, piecewise, one-request prefill, verify, mixed; a draft model's); later
        steps run eagerly. Call it before leaving a tensor-parallel group: graphs holding its all-reduces block the
        group's teardown."""
        for graphs in (
            self.graphs,
            self.piecewise,
            self.prefill_graphs,
            self.verify_graphs,
            self.mixed_graphs,
        ):
            if graphs is not None:
                graphs.release()
        self.graphs = self.piecewise = self.prefill_graphs = None
        self.verify_graphs = self.mixed_graphs = None
        if self.drafter is not None:
            self.drafter.release_graphs()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _require_model(self) -> CausalLM:
        if self.model is None:
            raise RuntimeError("ModelRunner.load_model() must run before this call")
        return self.model

    # ---- one step -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | AsyncModelRunnerOutput:
        """Run one step. Under async output the result may be an AsyncModelRunnerOutput (see pending.py)."""
        if not self.kv_caches:
            raise RuntimeError("ModelRunner.initialize_kv_cache() must run before execute()")
        self.buffers.wait_for_copies()  # the diff below rewrites pinned rows the last step copied from
        self._resolve_pending(keep_newest=True)
        apply_scheduler_output(self.batch, self.requests, scheduler_output)
        if self.lora is not None:  # their adapters may leave host memory now (lora/host_cache.py)
            self.lora.release(scheduler_output.finished_req_ids | scheduler_output.preempted_req_ids)
        if scheduler_output.total_num_scheduled_tokens == 0:
            return ModelRunnerOutput.empty()
        num_reqs = self.batch.num_reqs
        req_ids: list[str] = [r for r in self.batch.req_ids[:num_reqs] if r is not None]
        num_scheduled = np.array([scheduler_output.num_scheduled_tokens[r] for r in req_ids], dtype=np.int64)
        # speculative decoding: drafts to verify, staged in the token table (spec_decode.py)
        drafts = stage_drafts(self.batch, scheduler_output, num_scheduled, self.vocab_size)
        defer = (
            self.async_output
            and drafts is None
            and self.drafter is None
            and not any(
                s is not None and s.sampling_params.needs_host_tokens for s in self.batch.states[:num_reqs]
            )
        )
        if not defer:
            self._resolve_pending(keep_newest=False)
        chosen = batch_plan(num_scheduled, self.prefill_graphs, self.verify_graphs, self.mixed_graphs)
        if chosen is not None:  # a verify or mixed graph
            padded: int | None = chosen[1].tokens
        else:
            padded = padded_size(num_scheduled, self.graphs, self.prefill_graphs, self.piecewise)
        if self.lora is not None:  # before the inputs below: their staging event covers its copy too
            self.lora.prepare_step(self.batch.lora_ids[:num_reqs], num_scheduled,
                                   padded or scheduler_output.total_num_scheduled_tokens)  # fmt: skip
        newest = self.pending[-1] if self.pending else None
        source = device_source(newest, self.batch.req_ids)
        inputs = prepare_inputs(self.batch, num_scheduled, self.buffers, padded, source, drafts,
                                num_padded_reqs=chosen[1].reqs if chosen is not None else None)  # fmt: skip
        hidden = self._forward(inputs)
        output = sample_step(self, req_ids, inputs, hidden, defer)
        if self.drafter is not None:  # never deferred: its output is on the host
            assert isinstance(output, ModelRunnerOutput)
            self.drafter.propose(self, inputs, output)
        return output

    def _resolve_pending(self, keep_newest: bool) -> None:
        """Write landed sampled tokens into the host state: all steps in flight, or all but the newest."""
        keep = 1 if keep_newest else 0
        while len(self.pending) > keep:
            resolve(self.pending.pop(0), self.requests, self.batch)

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        model = self._require_model()
        return forward_step(self, inputs, model, self.graphs, self.prefill_graphs, self.piecewise,
                            self.verify_graphs, self.mixed_graphs)  # fmt: skip

    def forward_context(self, inputs: StepInputs, graph_size: int | None = None) -> ForwardContext:
        """The forward context of a step (eager), or of the dummy batch a decode graph of `graph_size` captures."""
        pairs = zip(self.builders, inputs.attn_metadata, strict=True)
        if graph_size is None:
            built = [b.build(m) for b, m in pairs]
        else:
            built = [b.build_for_cuda_graph(m, graph_size) for b, m in pairs]
        per_layer = [built[g] for g in self.layer_to_group]
        return ForwardContext(self.kv_caches, per_layer, inputs.num_tokens)
