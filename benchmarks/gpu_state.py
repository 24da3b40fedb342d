"""The GPU's SM clock, power and clock-event reasons sampled while a benchmark runs (``nvidia-smi`` every 0.5 s).

Why: the 1000 x 1024/1024 offline run holds an H200 at its 700 W power cap, at 1,635-1,815 MHz instead of 1,980
(session 11, results/gpu-power-h200-ef1a60f), and machines differ in the clock they hold there; a throughput
number is read with the clock it ran at. Each sample is stamped with ``time.monotonic()`` when it arrives, so
``summary(t0, t1)`` covers exactly a step's span. Without ``nvidia-smi`` (CPU, smoke runs) nothing is sampled and
every summary is None.

    with GpuStateSampler() as gpu:
        t0 = time.monotonic(); run(); print(gpu.summary(t0, time.monotonic()))
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
import threading
import time

QUERY = "clocks.sm,power.draw,clocks_event_reasons.active"
SW_POWER_CAP = 0x4  # clock-event reason bit: the clock is lowered to hold the power limit


def nvidia_smi_command(interval_ms: int = 500) -> list[str] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    return [exe, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-lms", str(interval_ms)]


class GpuStateSampler:
    """Runs ``command`` (default: nvidia-smi's CSV loop) in the background and keeps (time, MHz, W, reasons)."""

    def __init__(self, command: list[str] | None = None) -> None:
        self.command = command if command is not None else nvidia_smi_command()
        self.samples: list[tuple[float, float, float, int]] = []
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuStateSampler:
        if self.command:
            with contextlib.suppress(OSError):
                self._proc = subprocess.Popen(
                    self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
                )
                self._thread = threading.Thread(target=self._read, daemon=True)
                self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            fields = [f.strip() for f in line.split(",")]
            with contextlib.suppress(ValueError, IndexError):  # "[N/A]", headers, partial lines
                reasons = int(fields[2], 16) if len(fields) > 2 else 0
                self.samples.append((time.monotonic(), float(fields[0]), float(fields[1]), reasons))

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def summary(self, t0: float, t1: float) -> dict[str, float | int] | None:
        """Median SM clock and power over the samples in [t0, t1], and the share held at the power cap."""
        window = [s for s in self.samples if t0 <= s[0] <= t1]
        if not window:
            return None
        return {
            "samples": len(window),
            "sm_clock_mhz_median": statistics.median(s[1] for s in window),
            "sm_clock_mhz_min": min(s[1] for s in window),
            "power_w_median": statistics.median(s[2] for s in window),
            "power_capped_share": sum(bool(s[3] & SW_POWER_CAP) for s in window) / len(window),
        }
