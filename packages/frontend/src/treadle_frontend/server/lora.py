"""LoRA adapters served as models, as vLLM serves them.

`treadle serve --enable-lora --lora-modules name=path ...` names adapters (PEFT directories). At start-up each is
given an id (1, 2, ... in order) and loaded into the engine, which checks it against the model: a bad adapter stops
the server before it serves. A request whose `model` is an adapter's name runs with that adapter and its response
carries that name; /v1/models lists every adapter with `root` = its path and `parent` = the base model; any
other unknown name stays a 404. With TREADLE_ALLOW_RUNTIME_LORA_UPDATING set, POST /v1/load_lora_adapter
{lora_name, lora_path} and /v1/unload_lora_adapter {lora_name} add and remove adapters while serving. Loading a name
already served is an error unless `load_inplace` is true (vLLM's in-place reload, for weights that change while
serving, as in RL training): the adapter keeps its id and the engine reads the new directory; requests in flight
under that name run with the new weights from their next step on, and the prefix cache no longer matches KV that
the old weights computed (engine_core/core.py).

This module keeps the pydantic and FastAPI imports out: ServerConfig holds `LoRAModule`s.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from treadle_model_runner.lora.request import LoRARequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoRAModule:
    """One --lora-modules entry."""

    name: str  # the model id clients send
    path: str  # the PEFT adapter directory
    base_model_name: str | None = None  # the served model it adapts; None = the first served name


def parse_lora_modules(specs: list[str]) -> tuple[LoRAModule, ...]:
    """--lora-modules values: `name=path`, or vLLM's JSON form {"name": ..., "path": ..., "base_model_name": ...}."""
    modules = []
    for spec in specs:
        if spec.lstrip().startswith("{"):
            try:
                data = json.loads(spec)
                modules.append(LoRAModule(str(data["name"]), str(data["path"]), data.get("base_model_name")))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(
                    f'--lora-modules {spec!r}: the JSON form needs "name" and "path" ({exc})'
                ) from None
            continue
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(
                f"--lora-modules {spec!r} is not name=path (or a JSON object with name and path)"
            )
        modules.append(LoRAModule(name, path))
    names = [m.name for m in modules]
    if len(set(names)) != len(names):
        raise ValueError(f"--lora-modules names each adapter once; got {names}")
    return tuple(modules)


class ServedLoRAs:
    """The adapters this server serves, by name; ids are handed out in order and never reused."""

    def __init__(self) -> None:
        self.requests: dict[str, LoRARequest] = {}
        self._next_id = 1

    def get(self, name: str | None) -> LoRARequest | None:
        return self.requests.get(name) if name is not None else None

    async def load(
        self, llm: Any, name: str, path: str, base_model_name: str, load_inplace: bool = False
    ) -> LoRARequest:
        """Load an adapter into the engine (which checks it) and serve it as `name`. ValueError: a name already
        served (unless `load_inplace`: its weights are replaced from `path`), or an adapter the engine refuses
        (its message; an in-place reload that fails leaves the old weights serving)."""
        if not name or not path:
            raise ValueError("Both 'lora_name' and 'lora_path' must be provided.")
        served = self.requests.get(name)
        if served is not None and not load_inplace:
            raise ValueError(
                f"The lora adapter '{name}' has already been loaded; pass load_inplace: true to replace its weights."
            )
        if served is not None:
            request = LoRARequest(name, served.lora_int_id, path, served.base_model_name)
        else:
            request = LoRARequest(name, self._next_id, path, base_model_name)
        try:
            await llm.call_utility("add_lora", request, served is not None)
        except Exception as exc:  # the engine's ValueError (in-process), or its message over the utility RPC
            raise ValueError(str(exc).split("ValueError: ", 1)[-1]) from None
        if served is None:
            self._next_id += 1
        self.requests[name] = request
        how = "Reloaded in place" if served is not None else "Loaded"
        logger.info("%s LoRA adapter %r (id %d) from %s", how, name, request.lora_int_id, path)
        return request

    async def unload(self, llm: Any, name: str) -> None:
        """Stop serving `name` and drop it from the engine; KeyError when no adapter has that name."""
        request = self.requests.pop(name)
        await llm.call_utility("remove_lora", request.lora_int_id)
        logger.info("Removed LoRA adapter %r", name)

    def cards(self, created: int, max_model_len: int) -> list[dict[str, Any]]:
        """/v1/models entries: `root` = the adapter's path, `parent` = the model it adapts."""
        return [
            {
                "id": r.lora_name,
                "object": "model",
                "created": created,
                "owned_by": "treadle",
                "root": r.lora_path,
                "parent": r.base_model_name,
                "max_model_len": max_model_len,
            }
            for r in self.requests.values()
        ]
