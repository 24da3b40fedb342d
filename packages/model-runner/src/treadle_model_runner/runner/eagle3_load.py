"""Reading an EAGLE-3 head's checkpoint for a target model (speculative_config method eagle3, runner/eagle3.py).

The checkpoint is the EAGLE repo's layout: config.json with architectures ["LlamaForCausalLMEagle3"], one layer
(num_hidden_layers 1), vocab_size (the target's), draft_vocab_size, and safetensors holding `fc.weight`
[H, 3 * H_target], `midlayer.*`, `norm.weight`, `lm_head.weight` [draft_vocab, H], `d2t` [draft_vocab] int64 and
`t2d` [vocab] bool (unused); an `embed_tokens.weight` is the head's own embedding, else it shares the target's.
RedHat's speculators format (speculators_model_type "eagle3", architectures ["Eagle3Speculator"]) is read as vLLM
reads it: its transformer_layer_config is the head's config, with the top level's draft_vocab_size,
target_hidden_size, eagle_aux_hidden_state_layer_ids and norm_before_residual (default true there); its tensors name
the layer `layers.0` instead of `midlayer`.
Everything that would make the head read the wrong features is refused here, naming the file and the field: another
architecture, a target without hidden-state taps (models/llama.py's LlamaModel
has them), fc not 3 x the target's hidden size, another vocabulary, taps outside the target's layers.
The taps: config.json's eagle_aux_hidden_state_layer_ids (or eagle_config's) when given, else (2, L // 2, L - 3) of
the target's L layers, as vLLM.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from treadle_model_runner.layers.vocab import VocabParallelEmbedding
from treadle_model_runner.loader import iterate_weights
from treadle_model_runner.loader.light_config import light_config
from treadle_model_runner.loader.weights import CONFIG_FILE, describe_checkpoint
from treadle_model_runner.models import CausalLM
from treadle_model_runner.models.llama import LlamaModel
from treadle_model_runner.models.llama_eagle3 import EAGLE3_ARCHITECTURES, Eagle3LlamaForCausalLM
from treadle_model_runner.runner.draft_model import MAX_VOCAB_PADDING
from treadle_model_runner.runner.setup import default_dtype, skip_param_init

__all__ = ["aux_layers_of", "load_eagle3_head", "target_decoder"]


def target_decoder(target: CausalLM) -> LlamaModel:
    """The target's decoder, which keeps the hidden states EAGLE-3 reads; ValueError for a target without them."""
    decoder = getattr(target, "model", None)
    if not isinstance(decoder, LlamaModel) or type(decoder).forward is not LlamaModel.forward:
        raise ValueError(
            f"speculative_config method 'eagle3' reads the target's hidden states at three layers, which "
            f"{type(target).__name__} does not expose; EAGLE-3 runs with Llama-family targets (Llama, Mistral, "
            "Qwen2, Qwen3 and the others on models/llama.py's LlamaModel): use method 'draft_model' or 'ngram'"
        )
    return decoder


def aux_layers_of(raw: dict[str, Any], num_layers: int, config_file: Path) -> tuple[int, ...]:
    """The three target layers whose input hidden states the head reads (module docstring)."""
    eagle_config = raw.get("eagle_config")
    nested = eagle_config.get("eagle_aux_hidden_state_layer_ids") if isinstance(eagle_config, dict) else None
    ids = raw.get("eagle_aux_hidden_state_layer_ids") or nested
    layers = tuple(ids) if ids else (2, num_layers // 2, num_layers - 3)
    where = "the default (2, L // 2, L - 3)"
    if ids:
        top = bool(raw.get("eagle_aux_hidden_state_layer_ids"))
        where = "eagle_aux_hidden_state_layer_ids" if top else "eagle_config.eagle_aux_hidden_state_layer_ids"
    if len(layers) != 3 or not all(isinstance(i, int) and 0 <= i < num_layers for i in layers):
        raise ValueError(
            f"{config_file}: {where} names target layers {list(layers)}, but EAGLE-3 reads three layers among the "
            f"target's {num_layers} (0 to {num_layers - 1}): the head was trained for a deeper target"
        )
    return layers


def read_config(path: Path) -> dict[str, Any]:
    """config.json of an EAGLE-3 head, its architecture and layer count checked."""
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise ValueError(
            f"speculative_config model {str(path)!r}: {config_file} is missing; give the EAGLE-3 head's directory"
        )
    raw = json.loads(config_file.read_text())
    if "speculators_model_type" in raw:
        raw = _from_speculators(raw, config_file)
    names = list(raw.get("architectures") or [])
    if not set(names) & set(EAGLE3_ARCHITECTURES):
        raise ValueError(
            f"{config_file}: architectures {names} is not an EAGLE-3 head (expected {EAGLE3_ARCHITECTURES[0]!r}); "
            "a complete smaller model drafts with method 'draft_model'"
        )
    if raw.get("num_hidden_layers") != 1:
        raise ValueError(
            f"{config_file}: num_hidden_layers {raw.get('num_hidden_layers')!r}; treadle runs EAGLE-3 heads of "
            "one layer (`midlayer`)"
        )
    return raw


def _from_speculators(raw: dict[str, Any], config_file: Path) -> dict[str, Any]:
    """A speculators-format config.json as the EAGLE repo's (module docstring)."""
    kind = raw.get("speculators_model_type")
    layer = raw.get("transformer_layer_config")
    if kind != "eagle3":
        raise ValueError(
            f"{config_file}: speculators_model_type {kind!r}; treadle reads speculators checkpoints of type 'eagle3'"
        )
    if not isinstance(layer, dict):
        raise ValueError(
            f"{config_file}: a speculators checkpoint without a transformer_layer_config object (the head's layer "
            "config): the checkpoint is incomplete"
        )
    carried = ("draft_vocab_size", "target_hidden_size", "eagle_aux_hidden_state_layer_ids")
    return {
        **layer, **{k: raw[k] for k in carried if raw.get(k) is not None},
        "norm_before_residual": raw.get("norm_before_residual", True), "architectures": ["Eagle3LlamaForCausalLM"],
    }  # fmt: skip


def _config_of(raw: dict[str, Any], config_file: Path) -> Any:
    """The head's config object from its (speculators: flattened) config.json fields."""
    light = light_config(raw)
    if light is not None:
        return light
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**raw)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{config_file} cannot be read as a Llama layer's config ({exc})") from exc


def load_eagle3_head(
    model: str, target: CausalLM, dtype: torch.dtype, device: torch.device, max_model_len: int
) -> tuple[Eagle3LlamaForCausalLM, tuple[int, ...]]:
    """The head at `model` with its weights, its embedding shared with `target` unless it has its own, and the
    target layers it reads (not yet set on the target)."""
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"speculative_config model {model!r}: {path} is not a directory (the EAGLE-3 head's)"
        )
    raw = read_config(path)
    config_file = path / CONFIG_FILE
    decoder = target_decoder(target)
    target_hidden = int(target.config.hidden_size)
    vocab = int(target.config.vocab_size)
    declared = raw.get("target_hidden_size")
    if declared is not None and declared != target_hidden:
        raise ValueError(
            f"{config_file}: target_hidden_size {declared} but the target's hidden_size is {target_hidden}: the "
            "head was trained for another target model"
        )
    if abs(int(raw.get("vocab_size", -1)) - vocab) > MAX_VOCAB_PADDING:
        raise ValueError(
            f"{config_file}: vocab_size {raw.get('vocab_size')!r} but the target's is {vocab}: an EAGLE-3 head "
            "must share the target's tokenizer"
        )
    aux = aux_layers_of(raw, len(decoder.layers), config_file)
    hf_config = _config_of(raw, config_file)
    with default_dtype(dtype), device, skip_param_init():
        head = Eagle3LlamaForCausalLM(hf_config, max_model_len, target_hidden)
    source = describe_checkpoint(path)
    own: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        head.load_weights(_checked(iterate_weights(path, "safetensors"), head, target_hidden, vocab, source, own),
                          source)  # fmt: skip
    _check_d2t(head, vocab, source)
    embedding = own.get("embed_tokens.weight")
    if embedding is not None:
        with default_dtype(dtype), device:
            embed = VocabParallelEmbedding(embedding.shape[0], embedding.shape[1])
        with torch.no_grad():
            embed.weight.copy_(embedding)
        head.share_embedding(embed.requires_grad_(False))
    elif int(hf_config.hidden_size) != target_hidden:
        raise ValueError(
            f"{source} holds no embed_tokens.weight, so the head reads the target's embeddings, {target_hidden} "
            f"wide, but its hidden_size is {hf_config.hidden_size} ({config_file})"
        )
    else:
        head.share_embedding(decoder.embed_tokens)
    head.eval().requires_grad_(False)
    return head, aux


def _checked(
    weights: Iterator[tuple[str, torch.Tensor]],
    head: Eagle3LlamaForCausalLM,
    target_hidden: int,
    vocab: int,
    source: str,
    own: dict[str, torch.Tensor],
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors for `head.load_weights`: fc's width checked, an embedding set aside in `own`, and
    the identity d2t when there is none and the draft vocabulary is the target's."""
    has_d2t = False
    for name, tensor in weights:
        # the speculators format's name of the one layer
        name = "midlayer." + name.removeprefix("layers.0.") if name.startswith("layers.0.") else name
        if name == "fc.weight" and (tensor.dim() != 2 or tensor.shape[1] != 3 * target_hidden):
            raise ValueError(
                f"{source}: fc.weight has shape {tuple(tensor.shape)}; an EAGLE-3 head for this target takes 3 x its "
                f"hidden_size ({target_hidden}) = {3 * target_hidden} input columns: the head was trained for "
                "another target model"
            )
        if name == "embed_tokens.weight":
            own[name] = tensor
            continue
        has_d2t = has_d2t or name == "d2t"
        yield name, tensor
    if not has_d2t:
        if head.draft_vocab_size != vocab:
            raise ValueError(
                f"{source} holds no d2t tensor, which maps the head's {head.draft_vocab_size} draft token ids to "
                f"the target's {vocab}: the checkpoint is incomplete"
            )
        yield "d2t", torch.zeros_like(head.d2t)


def _check_d2t(head: Eagle3LlamaForCausalLM, vocab: int, source: str) -> None:
    """Every draft id must map into the target's vocabulary."""
    targets = torch.arange(head.draft_vocab_size, device=head.d2t.device) + head.d2t
    if int(targets.min()) < 0 or int(targets.max()) >= vocab:
        raise ValueError(
            f"{source}: d2t maps draft token ids to target ids in [{int(targets.min())}, {int(targets.max())}], "
            f"outside the target's vocabulary [0, {vocab})"
        )
