"""The conversion cache: atomic publish, crash safety, one conversion under concurrency, invalidation.

A fake converter stands in for GGUF conversion (the real one is covered by test_loader_gguf.py and
test_default_model.py), so these tests exercise only the publish protocol.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from treadle_model_runner.loader import convert_gguf_cached
from treadle_model_runner.loader.cache import CONVERTER_VERSION, MARKER_FILE, is_converted


def fake_convert(calls: list[Path] | None = None, delay: float = 0.0):
    def convert(gguf_path: Path, out_dir: Path, dtype: torch.dtype, progress) -> None:
        if calls is not None:
            calls.append(out_dir)
        (out_dir / "config.json").write_text(json.dumps({"model_type": "llama", "source": str(gguf_path)}))
        time.sleep(delay)
        (out_dir / "model.safetensors").write_bytes(b"weights")
        if progress is not None:
            progress(1, 1)

    return convert


@pytest.fixture()
def source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TREADLE_CONVERSION_PROGRESS", "0")
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    return path


def visible(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if not p.name.endswith(".lock"))


def test_convert_once_then_return_at_once(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache" / "m"
    calls: list[Path] = []
    assert convert_gguf_cached(source, out, "fp1", convert=fake_convert(calls)) == out
    assert is_converted(out, "fp1", torch.float32) and len(calls) == 1
    assert json.loads((out / MARKER_FILE).read_text())["converter_version"] == CONVERTER_VERSION
    assert oct((out / "model.safetensors").stat().st_mode & 0o044) == oct(0o044 & ~_umask())  # readable
    start = time.perf_counter()
    assert convert_gguf_cached(source, out, "fp1", convert=fake_convert(calls)) == out
    assert time.perf_counter() - start < 0.05 and len(calls) == 1
    assert visible(out.parent) == ["m"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_failure_mid_conversion_publishes_nothing(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache" / "m"

    def failing(gguf_path: Path, out_dir: Path, dtype: torch.dtype, progress) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        convert_gguf_cached(source, out, "fp", convert=failing)
    assert not out.exists() and visible(out.parent) == []  # no final dir, no temp left behind


@pytest.mark.slow  # a child interpreter imports torch: ~5-15 s
def test_killed_converter_leaves_nothing_loadable(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache" / "m"
    child = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from treadle_model_runner.loader.cache import convert_gguf_cached

        def crash(gguf_path, out_dir, dtype, progress):
            (out_dir / "config.json").write_text("{{}}")
            (out_dir / "model.safetensors").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)  # power cut: no cleanup runs

        convert_gguf_cached(Path({str(source)!r}), Path({str(out)!r}), "fp", convert=crash)
        """
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    leftovers = visible(out.parent)
    assert not out.exists() and len(leftovers) == 1 and leftovers[0].startswith(".m.tmp-")
    assert not is_converted(out.parent / leftovers[0], "fp", torch.float32)  # no marker: never complete
    assert convert_gguf_cached(source, out, "fp", convert=fake_convert()) == out
    assert visible(out.parent) == ["m"]  # the next converter cleaned the crash's leftovers
    assert (out / "model.safetensors").read_bytes() == b"weights"


def test_concurrent_converters_convert_once(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache" / "m"
    calls: list[Path] = []
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                convert_gguf_cached(source, out, "fp", convert=fake_convert(calls, 0.3))
            )
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [out] * 3 and len(calls) == 1
    assert visible(out.parent) == ["m"]


@pytest.mark.parametrize("stale", ["other-source", "old-version", "no-marker"])
def test_outdated_conversion_is_replaced(source: Path, tmp_path: Path, stale: str) -> None:
    out = tmp_path / "cache" / "m"
    calls: list[Path] = []
    convert_gguf_cached(source, out, "fp-old", convert=fake_convert())
    marker = json.loads((out / MARKER_FILE).read_text())
    if stale == "old-version":
        marker.update(source="fp-new", converter_version=CONVERTER_VERSION - 1)
        (out / MARKER_FILE).write_text(json.dumps(marker))
    elif stale == "no-marker":
        (out / MARKER_FILE).unlink()
    (out / "stale-file").write_text("x")
    assert convert_gguf_cached(source, out, "fp-new", convert=fake_convert(calls)) == out
    assert len(calls) == 1 and not (out / "stale-file").exists()
    assert is_converted(out, "fp-new", torch.float32) and visible(out.parent) == ["m"]
    # another dtype is another conversion
    assert not is_converted(out, "fp-new", torch.bfloat16)


def test_progress_bar_goes_to_stderr(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TREADLE_CONVERSION_PROGRESS", "1")
    convert_gguf_cached(source, tmp_path / "cache" / "m", "fp", convert=fake_convert())
    captured = capfd.readouterr()
    assert "converting m.gguf" in captured.err and captured.out == ""


def test_unwritable_cache_says_which_variable_to_set(source: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"cannot write the converted model under .*file.*TREADLE_CACHE_DIR"):
        convert_gguf_cached(source, blocker / "models" / "m", "fp", convert=fake_convert())


def test_gguf_storage_dtype(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from treadle_model_runner.loader import resolve

    small = tmp_path / "small.gguf"
    small.write_bytes(b"GGUF")
    assert resolve.gguf_storage_dtype(small, "auto") == torch.float32
    assert resolve.gguf_storage_dtype(small, "bfloat16") == torch.bfloat16
    monkeypatch.setattr(resolve, "AUTO_FP32_MAX_GGUF_BYTES", 4)
    assert resolve.gguf_storage_dtype(small, "auto") == torch.bfloat16  # large files: half the disk
