"""`treadle chat` and `treadle complete`: talk to a running treadle (or any OpenAI-compatible) server.

As `vllm chat` / `vllm complete`: `--url` (default http://localhost:8000/v1), `--model-name` (default: the
server's first model), `--api-key`, `--system-prompt`, `--quick "message"` (one exchange, then exit).
Replies stream to stdout as they are generated; the conversation is kept for the next turn.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import httpx

DEFAULT_URL = "http://localhost:8000/v1"


def add_client_args(p: argparse.ArgumentParser, chat: bool) -> None:
    p.add_argument("--url", default=DEFAULT_URL, help=f"the server's OpenAI base URL (default {DEFAULT_URL})")
    p.add_argument("--model-name", default=None, help="model id (default: the server's first model)")
    p.add_argument(
        "--api-key",
        default=None,
        help="API key, if the server wants one (default: $OPENAI_API_KEY, as vLLM's)",
    )
    p.add_argument(
        "-q", "--quick", default=None, metavar="MESSAGE", help="send one message, print the reply, exit"
    )
    p.add_argument("--max-tokens", type=int, default=None, help="most tokens per reply")
    p.add_argument("--temperature", type=float, default=None)
    if chat:
        p.add_argument("--system-prompt", default=None, help="a system message opening the conversation")


class _Client:
    def __init__(self, args: argparse.Namespace) -> None:
        key = args.api_key or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(
            base_url=args.url.rstrip("/"), headers=headers, timeout=httpx.Timeout(600, connect=10)
        )
        self.model = args.model_name or self._first_model()

    def _unreachable(self, e: Exception) -> SystemExit:
        return SystemExit(
            f"cannot reach the server at {self.http.base_url} ({e}); start one with `treadle serve`"
        )

    def _first_model(self) -> str:
        try:
            r = self.http.get("/models")
        except httpx.HTTPError as e:
            raise self._unreachable(e) from e
        if r.status_code != 200:
            raise SystemExit(f"GET /models failed with {r.status_code}: {r.text}")
        return str(r.json()["data"][0]["id"])

    def stream(self, route: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        try:
            with self.http.stream("POST", route, json={**body, "model": self.model, "stream": True}) as r:
                if r.status_code != 200:
                    r.read()
                    raise SystemExit(f"the server answered {r.status_code}: {r.text}")
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data.strip() == "[DONE]":
                        return
                    yield json.loads(data)
        except httpx.HTTPError as e:  # down (--model-name skips the /models probe) or gone mid-reply
            raise self._unreachable(e) from e


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        body["temperature"] = args.temperature
    return body


def _print_stream(chunks: Iterator[dict[str, Any]], key: str) -> str:
    parts = []
    for chunk in chunks:
        if "error" in chunk:
            raise SystemExit(f"error: {chunk['error'].get('message')}")
        for choice in chunk.get("choices", []):
            text = (choice.get("delta") or {}).get("content") if key == "chat" else choice.get("text")
            if text:
                parts.append(text)
                sys.stdout.write(text)
                sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(parts)


def _read(prompt: str) -> str | None:
    try:
        return input(prompt)
    except (EOFError, KeyboardInterrupt):
        return None


def run_chat(args: argparse.Namespace) -> int:
    client = _Client(args)
    messages: list[dict[str, str]] = []
    if args.system_prompt:
        messages.append({"role": "system", "content": args.system_prompt})
    if args.quick is not None:
        messages.append({"role": "user", "content": args.quick})
        _print_stream(client.stream("/chat/completions", {"messages": messages, **_sampling(args)}), "chat")
        return 0
    print(f"Chatting with {client.model} at {args.url} (Ctrl-D to quit)")
    while (line := _read("> ")) is not None:
        messages.append({"role": "user", "content": line})
        reply = _print_stream(
            client.stream("/chat/completions", {"messages": messages, **_sampling(args)}), "chat"
        )
        messages.append({"role": "assistant", "content": reply})
    return 0


def run_complete(args: argparse.Namespace) -> int:
    client = _Client(args)
    if args.quick is not None:
        _print_stream(client.stream("/completions", {"prompt": args.quick, **_sampling(args)}), "complete")
        return 0
    print(f"Completing with {client.model} at {args.url} (Ctrl-D to quit)")
    while (line := _read("> ")) is not None:
        _print_stream(client.stream("/completions", {"prompt": line, **_sampling(args)}), "complete")
    return 0
