"""benchmarks/gpu_state.py: the clock / power sampler, driven by a stand-in for nvidia-smi's CSV loop."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_state import GpuStateSampler  # noqa: E402

# clock MHz, power W, clock-event reasons: two samples at the power cap (bit 0x4), one idle (0x1), one unreadable
LINES = ["1800, 690.5, 0x0000000000000004", "1650, 694.0, 0x0000000000000004", "345, 77.0, 0x0000000000000001",
         "[N/A], [N/A], [N/A]"]  # fmt: skip


def stand_in(lines: list[str]) -> list[str]:
    script = "import sys, time\n" + "".join(f"print({line!r}, flush=True)\n" for line in lines)
    return [sys.executable, "-c", script + "time.sleep(30)"]


def wait_for(sampler: GpuStateSampler, count: int) -> None:
    deadline = time.monotonic() + 20
    while len(sampler.samples) < count and time.monotonic() < deadline:
        time.sleep(0.02)


def test_summary_medians_and_the_capped_share() -> None:
    t0 = time.monotonic()
    with GpuStateSampler(stand_in(LINES)) as gpu:
        wait_for(gpu, 3)
    t1 = time.monotonic()
    assert [s[1:] for s in gpu.samples] == [(1800.0, 690.5, 4), (1650.0, 694.0, 4), (345.0, 77.0, 1)]
    summary = gpu.summary(t0, t1)
    assert summary is not None
    assert summary["samples"] == 3
    assert summary["sm_clock_mhz_median"] == 1650.0
    assert summary["sm_clock_mhz_min"] == 345.0
    assert summary["power_w_median"] == 690.5
    assert summary["power_capped_share"] == pytest.approx(2 / 3)
    assert gpu.summary(t1 + 1, t1 + 2) is None, "a window without samples has no summary"


def test_no_sampler_means_no_summary() -> None:
    with GpuStateSampler([]) as gpu:  # no nvidia-smi on the machine
        pass
    assert gpu.summary(0.0, time.monotonic()) is None
    with GpuStateSampler(["/nonexistent/nvidia-smi"]) as gpu:  # a command that cannot start
        pass
    assert gpu.samples == []
