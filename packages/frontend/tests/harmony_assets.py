"""A gpt-oss-like test server built on the spot: a tiny byte-level BPE tokenizer whose harmony markers are special
tokens, a harmony-style chat template written here (system turn with `Reasoning: {effort}`, tool-call turns
`to=functions.NAME`, tool results from `functions.NAME`), and a fake engine that writes scripted replies. The model
reports model_type gpt_oss, so the server picks the harmony parser by itself. No downloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MARKERS = ["<|start|>", "<|channel|>", "<|message|>", "<|constrain|>", "<|end|>", "<|return|>", "<|call|>"]
SPECIALS = ["<|endoftext|>", *MARKERS]
CORPUS = [
    "The user asks about the weather in Paris. I should call the tool, then answer briefly.",
    "It is sunny and 21 degrees in Paris. Have a nice day! café 😀",
    '{"city": "Paris"} {"temp": 21} functions.get_weather assistant analysis commentary final json',
]
TEMPLATE = (
    "<|start|>system<|message|>Reasoning: {{ reasoning_effort | default('medium') }}<|end|>"
    "{%- set ns = namespace(last='') %}"
    "{%- for m in messages %}"
    "{%- if m.role in ('system', 'developer') %}<|start|>developer<|message|>{{ m.content }}<|end|>"
    "{%- elif m.role == 'user' %}<|start|>user<|message|>{{ m.content }}<|end|>"
    "{%- elif m.role == 'assistant' and m.tool_calls %}"
    "{%- if m.thinking %}<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>{% endif %}"
    "{%- set call = m.tool_calls[0].function %}{%- set ns.last = call.name %}"
    "<|start|>assistant to=functions.{{ call.name }}<|channel|>commentary json<|message|>"
    "{{ call.arguments | tojson }}<|call|>"
    "{%- elif m.role == 'assistant' %}<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>"
    "{%- elif m.role == 'tool' %}<|start|>functions.{{ ns.last }} to=assistant<|channel|>commentary<|message|>"
    "{{ m.content | tojson }}<|end|>"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|start|>assistant{% endif %}"
)
ANALYSIS = (
    "<|channel|>analysis<|message|>The user asks about the weather in Paris. I should call the tool.<|end|>"
)
FINAL = "<|start|>assistant<|channel|>final<|message|>It is sunny and 21 degrees in Paris, café 😀!<|return|>"
PREAMBLE = "<|start|>assistant<|channel|>commentary<|message|>Checking the weather.<|end|>"
CALL = (
    "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
    '{"city": "Paris"}<|call|>'
)
THOUGHT = "The user asks about the weather in Paris. I should call the tool."
ANSWER = "It is sunny and 21 degrees in Paris, café 😀!"


def build_harmony_tokenizer(path: Path) -> Any:
    """A byte-level BPE of 300 pieces (so words, the emoji and the accent split over several tokens) with the
    harmony markers as special tokens and `<|return|>` as EOS, saved with TEMPLATE and loaded as the server does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from treadle_frontend.tokenizer import load_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|return|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": MARKERS})
    fast.chat_template = TEMPLATE
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(path))
    return load_tokenizer(path)


class HarmonyServer:
    """The running test server: its URL, fake engine, tokenizer, and the prompts the engine was sent."""

    def __init__(self, url: str, engine: Any, tokenizer: Any) -> None:
        self.url, self.engine, self.tokenizer = url, engine, tokenizer
        self.prompts: list[list[int]] = []
        self.requests: list[Any] = []  # the engine requests, sampling params included

    def script(self, text: str) -> list[int]:
        """Every reply from now on: `text`'s tokens (markers as special tokens), then EOS."""
        self.engine.script = ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ids

    def last_prompt(self) -> str:
        return str(self.tokenizer.decode(self.prompts[-1], skip_special_tokens=False))


def start_harmony_server(tokenizer: Any, **server_options: Any) -> tuple[Any, HarmonyServer]:
    """(the ThreadedServer to enter, its handle): a model of model_type gpt_oss behind a fake engine."""
    from fake_engine import FakeAsyncClient, fake_request
    from frontend_helpers import make_engine
    from server_harness import ThreadedServer

    from treadle_frontend.async_llm import AsyncLLM
    from treadle_frontend.input_processor import InputProcessor, ModelInfo
    from treadle_frontend.server import ServerConfig, build_app
    from treadle_frontend.tokenizer import resolve_chat_template

    engine = make_engine(tokenizer)
    info = ModelInfo(name="gpt-oss-tiny", path=None, max_model_len=2048, vocab_size=len(tokenizer),
                     model_type="gpt_oss")  # fmt: skip
    processor = InputProcessor(tokenizer, info, chat_template=resolve_chat_template(tokenizer, None))
    llm = AsyncLLM(FakeAsyncClient(engine), processor, request_factory=fake_request)
    config = ServerConfig(
        host="127.0.0.1", served_model_name="tiny", stats_log_interval_s=0.5, **server_options
    )
    server = ThreadedServer(build_app(llm, config))
    handle = HarmonyServer(server.url, engine, tokenizer)
    add = engine.add

    def recording_add(request: Any) -> None:
        handle.prompts.append(list(request.prompt_token_ids))
        handle.requests.append(request)
        add(request)

    engine.add = recording_add  # type: ignore[method-assign]
    return server, handle
