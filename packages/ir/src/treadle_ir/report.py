"""The dispatch report: every op, its providers, the one chosen here for typical arguments, and why not others.

Typical arguments come from each op's ``example(device, dtype)`` (model-sized rows, a few tokens) on the
platform's device, in bf16 on CUDA and the default dtype on CPU. The engine logs this report at start;
``python -m treadle_ir report`` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import config, plugins, state
from .platforms import Platform, current_platform

__all__ = ["OpReport", "collect", "report"]


@dataclass(frozen=True)
class OpReport:
    """Dispatch facts for one op on one platform."""

    name: str  # op name
    providers: tuple[str, ...]  # registered provider names, native first
    priority: tuple[str, ...]  # effective priority list, native last
    source: str  # where the priority list came from
    selected: str  # provider chosen for the op's typical arguments
    skipped: dict[str, str]  # provider -> why it was not chosen


def _typical_dtype(platform: Platform) -> torch.dtype:
    return torch.bfloat16 if platform.is_cuda else torch.get_default_dtype()


def collect(platform: Platform | None = None) -> list[OpReport]:
    """Dispatch facts for every declared op."""
    platform = platform or current_platform()
    plugins.load_plugins()
    reports = []
    for ir_op in state.all_ops():
        resolution = ir_op.resolve(platform)
        if ir_op.example is not None:
            args = ir_op.example(platform.device, _typical_dtype(platform))
            chosen, skipped = ir_op.explain(*args)
            selected = chosen.name
        else:
            selected = resolution.candidates[0].name if resolution.candidates else "native"
            skipped = dict(resolution.skipped)
        reports.append(
            OpReport(
                ir_op.name, tuple(ir_op.providers), resolution.priority, resolution.source, selected, skipped
            )
        )
    return reports


def report(platform: Platform | None = None) -> str:
    """Human-readable dispatch report for this machine (one block per op)."""
    platform = platform or current_platform()
    lines = [
        f"treadle IR dispatch on {platform.kind} ({platform.device_name}, capability {platform.capability}); "
        f"batch-invariant mode {'on' if config.batch_invariant_enabled() else 'off'}"
    ]
    loaded = plugins.loaded_plugins()
    if loaded:
        lines.append("plugins: " + ", ".join(f"{name}: {status}" for name, status in loaded.items()))
    for item in collect(platform):
        lines.append(
            f"{item.name}: selected {item.selected}  (priority {', '.join(item.priority)}; {item.source})"
        )
        for provider in item.providers:
            if provider != item.selected:
                lines.append(f"    {provider}: skipped: {item.skipped.get(provider, 'not considered')}")
    return "\n".join(lines)
