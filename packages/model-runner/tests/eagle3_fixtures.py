"""Test helpers (no tests here): tiny EAGLE-3 heads saved in the EAGLE repo's checkpoint layout, for tiny targets,
and a driver that serves requests feeding the runner's drafts back as the engine does (`serve`).

A head's tensors, as the EAGLE repo names them: fc.weight [H, 3 * H_target], midlayer.{input_layernorm,
hidden_norm, post_attention_layernorm}.weight, midlayer.self_attn.{q,k,v}_proj.weight [.., 2 * H],
midlayer.self_attn.o_proj.weight, midlayer.mlp.{gate,up,down}_proj.weight, norm.weight, lm_head.weight
[draft_vocab, H], d2t [draft_vocab] int64 and t2d [vocab] bool.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from test_runner_fakes import FakeScheduler

from treadle_model_runner import SamplingParams
from treadle_model_runner.runner import ModelRunner

HEAD_SHAPE = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2}


def head_config(vocab_size: int, draft_vocab_size: int, **fields: Any) -> dict[str, Any]:
    """config.json of a one-layer EAGLE-3 head (HEAD_SHAPE unless `fields` say otherwise)."""
    return {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "max_position_embeddings": 2048,
        "tie_word_embeddings": False, "vocab_size": vocab_size, "draft_vocab_size": draft_vocab_size,
        **HEAD_SHAPE, **fields,
    }  # fmt: skip


def random_head(
    config: dict[str, Any], target_hidden: int, seed: int, std: float = 0.2
) -> dict[str, torch.Tensor]:
    """Random head tensors for `config` (norm weights near 1), d2t mapping draft id i to target id 2 * i + 1 when
    the draft vocabulary is smaller, else the identity."""
    gen = torch.Generator().manual_seed(seed)
    h, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    vocab, draft_vocab = config["vocab_size"], config["draft_vocab_size"]

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def norm() -> torch.Tensor:
        return 1.0 + rand(h)

    ids = torch.arange(draft_vocab)
    targets = ids * 2 + 1 if draft_vocab < vocab else ids
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[targets] = True
    return {
        "fc.weight": rand(h, 3 * target_hidden), "midlayer.input_layernorm.weight": norm(),
        "midlayer.hidden_norm.weight": norm(), "midlayer.post_attention_layernorm.weight": norm(),
        "midlayer.self_attn.q_proj.weight": rand(q, 2 * h), "midlayer.self_attn.k_proj.weight": rand(kv, 2 * h),
        "midlayer.self_attn.v_proj.weight": rand(kv, 2 * h), "midlayer.self_attn.o_proj.weight": rand(h, q),
        "midlayer.mlp.gate_proj.weight": rand(inter, h), "midlayer.mlp.up_proj.weight": rand(inter, h),
        "midlayer.mlp.down_proj.weight": rand(h, inter), "norm.weight": norm(),
        "lm_head.weight": rand(draft_vocab, h) * 5, "d2t": targets - ids, "t2d": t2d,
    }  # fmt: skip


def save_speculators_head(path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """The head of `config` and `tensors` in RedHat's speculators format: the layer's config nested, its tensors
    named `layers.0.*`, norm_before_residual left to the format's default (true)."""
    layer = {k: v for k, v in config.items() if k not in ("architectures", "draft_vocab_size")}
    speculators = {
        "architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3", "transformer_layer_config": layer,
        "draft_vocab_size": config["draft_vocab_size"], "speculators_version": "0.1.0",
        "speculators_config": {"algorithm": "eagle3", "proposal_methods": [{"speculative_tokens": 3}],
                               "verifier": {"name_or_path": "target"}},
    }  # fmt: skip
    renamed = {("layers.0." + k.removeprefix("midlayer.") if k.startswith("midlayer.") else k): v
               for k, v in tensors.items()}  # fmt: skip
    return save_head(path, speculators, renamed)


def save_head(path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write `config` as config.json and `tensors` as model.safetensors into `path`."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


@dataclass
class Served:
    outputs: dict[str, list[int]]  # request id -> its generated tokens
    num_verifications: int = 0  # steps in which a request verified drafts (counted per request)
    num_draft_tokens: int = 0  # drafts verified
    num_accepted: int = 0  # drafts kept
    # every step's proposals (request id -> drafts), in order
    proposals: list[dict[str, list[int]]] = field(default_factory=list)

    @property
    def mean_accepted(self) -> float:
        """Drafts kept per verification."""
        return self.num_accepted / max(self.num_verifications, 1)


def serve(
    runner: ModelRunner, prompts: list[list[int]], params: list[SamplingParams], max_tokens: int, budget: int
) -> Served:
    """Run the requests to the end as the engine would: running requests first, a prefill chunked under `budget`
    tokens a step, and a decoding request verifying the drafts the runner proposed after its last step (slots
    allocated for them: the scheduler's lookahead)."""
    sched = FakeScheduler(runner)
    sched.lookahead = runner.num_speculative_tokens
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        sched.add(f"r{i}", prompt, p, max_tokens=max_tokens)
    served = Served({})
    drafts: dict[str, list[int]] = {}
    while sched.requests:
        plan: dict[str, int] = {}
        verify: dict[str, list[int]] = {}
        left = budget
        for req_id, req in sched.requests.items():
            ahead = drafts.get(req_id, []) if req.num_computed == req.num_tokens - 1 else []
            n = (
                1 + len(ahead)
                if req.num_computed == req.num_tokens - 1
                else req.num_tokens - req.num_computed
            )
            if n > left and ahead:
                ahead, n = [], 1
            n = min(n, left)
            if n > 0:
                plan[req_id], left = n, left - n
                if ahead:
                    verify[req_id] = ahead
        out = sched.step(plan, verify)
        for req_id, ahead in verify.items():
            kept = len(out.sampled_token_ids[out.req_id_to_index[req_id]]) - 1
            served.num_verifications += 1
            served.num_draft_tokens += len(ahead)
            served.num_accepted += kept
        for req_id in plan:
            drafts[req_id] = out.draft_token_ids.get(req_id, [])
        served.proposals.append(dict(out.draft_token_ids))
    served.outputs = {r: sched.done_outputs[r] for r in (f"r{i}" for i in range(len(prompts)))}
    return served
