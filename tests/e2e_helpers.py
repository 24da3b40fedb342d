"""Constants and helpers of the end-to-end tests (a real `treadle serve` in a subprocess)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

API_KEY = "e2e-key"
MODEL_NAME = "tiny"
MAX_MODEL_LEN = 256
ROOT = Path(__file__).resolve().parent.parent

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 400,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}

CHAT: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children_of(pid: int) -> list[int]:
    """Live descendants of `pid` (from /proc)."""
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        kids.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


class RealServer:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log

    def engine_pid(self) -> int:
        for pid in children_of(self.proc.pid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "multiprocessing" in cmd and "resource_tracker" not in cmd:
                return pid
        raise AssertionError(f"no engine process under {self.proc.pid}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(model: Path, log: Path, extra: list[str], port: int | None = None) -> RealServer:
    """`treadle serve` on `model` (dummy weights unless `extra` says otherwise) on `port` (None: a free one), once
    /health answers 200."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "treadle.cli", "serve", str(model), "--load-format", "dummy", "--port", str(port),
           "--host", "127.0.0.1", "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-space", "0.01",
           "--api-key", API_KEY, "--served-model-name", MODEL_NAME, "--max-num-seqs", "16",
           "--uvicorn-log-level", "warning", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    server = RealServer(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + 240
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"treadle serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"treadle serve not ready in 240 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
    except BaseException:
        server.stop()
        raise
