"""Converted models in the user cache: built once, published atomically, reused instantly.

Theory: a converted directory is complete exactly when it exists under its final name *and* its marker
(``treadle_conversion.json``) records the converter version, the source fingerprint and the dtype asked for.
Conversion writes into a private temp directory beside the final one (same filesystem), fsyncs it, and
renames it into place: rename is atomic, so readers see either nothing or a whole directory.

Invariants:
- A crash mid-conversion leaves only a ``.<name>.tmp-*`` directory, which nothing loads and the next
  converter deletes.
- Concurrent converters serialise on ``.<name>.lock`` (``flock``): the second one waits, then finds the
  first one's result and returns it without converting again.
- A directory whose marker disagrees (older converter, changed source) is replaced, never half-reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from treadle_model_runner import envs
from treadle_model_runner.loader.gguf_convert import ProgressCallback, convert_gguf, fsync_dir, fsync_tree

logger = logging.getLogger(__name__)

MARKER_FILE = "treadle_conversion.json"
CONVERTER_VERSION = 1  # bump when the converted layout changes: older cached directories are rebuilt


def models_cache_dir() -> Path:
    """``<cache>/models``: where converted models live (see ``envs.TREADLE_CACHE_DIR``)."""
    return envs.TREADLE_CACHE_DIR() / "models"


def _marker(fingerprint: str, dtype: torch.dtype) -> dict[str, Any]:
    return {"converter_version": CONVERTER_VERSION, "source": fingerprint, "dtype": str(dtype)}


def is_converted(out_dir: Path, fingerprint: str, dtype: torch.dtype) -> bool:
    """True when ``out_dir`` is a complete conversion of the source named by ``fingerprint``."""
    try:
        return bool(json.loads((out_dir / MARKER_FILE).read_text()) == _marker(fingerprint, dtype))
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another process is converting into %s; waiting for it", lock_path.parent)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _progress_bar(description: str, enabled: bool) -> Iterator[ProgressCallback | None]:
    if not enabled:
        yield None
        return
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with transformers; without it conversion runs silently
        yield None
        return
    bar = tqdm(desc=description, unit="tensor", file=sys.stderr, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def _make_readable(path: Path) -> None:
    """Give the directory and its files the umask's usual modes (mkdtemp makes them private)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    for file in path.iterdir():
        file.chmod(0o666 & ~umask)


def convert_gguf_cached(
    gguf_path: Path,
    out_dir: Path,
    fingerprint: str,
    dtype: torch.dtype = torch.float32,
    progress: ProgressCallback | None = None,
    convert: Callable[..., None] = convert_gguf,
) -> Path:
    """Return ``out_dir``, converting ``gguf_path`` into it first unless a complete conversion is there.

    ``fingerprint`` identifies the source file's content (a hash or path+size+mtime); ``progress(done,
    total)`` replaces the stderr progress bar when given; ``convert`` is the conversion function (tests
    inject failures through it).
    """
    if is_converted(out_dir, fingerprint, dtype):
        return out_dir
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        (out_dir.parent / f".{out_dir.name}.lock").touch()
    except OSError as exc:
        raise ValueError(
            f"cannot write the converted model under {out_dir.parent} ({exc}); point TREADLE_CACHE_DIR at a "
            "writable directory"
        ) from exc
    with _exclusive(out_dir.parent / f".{out_dir.name}.lock"):
        if is_converted(out_dir, fingerprint, dtype):  # another process finished while we waited
            return out_dir
        for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):  # crashed converters' leftovers
            logger.info("removing %s, left by an interrupted conversion", stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            with _progress_bar(f"converting {gguf_path.name}", envs.TREADLE_CONVERSION_PROGRESS()) as bar:
                convert(gguf_path, tmp, dtype=dtype, progress=progress or bar)
            marker = _marker(fingerprint, dtype)
            (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
            _make_readable(tmp)
            fsync_tree(tmp)  # the converter's files and the marker are durable before the rename
            if out_dir.exists():  # outdated conversion: move it aside, then publish the new one
                logger.info("replacing outdated conversion %s", out_dir)
                out_dir.rename(Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-old-", dir=out_dir.parent)))
            tmp.rename(out_dir)
            fsync_dir(out_dir.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-old-*"):
            shutil.rmtree(stale, ignore_errors=True)
    logger.info("converted %s into %s", gguf_path, out_dir)
    return out_dir
