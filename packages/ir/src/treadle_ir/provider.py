"""A provider: one implementation of one IR op, with the checks that decide whether dispatch may use it.

``supported(platform)`` is a static check made once per resolution (``True``, or ``False`` / a string giving
the reason it cannot run here). ``supports_args(*args)`` is checked on every eager call and once per node at
compile time (dtypes, shapes, strides, devices; ``True`` or a reason). An exception in either check counts
as "unsupported" with the exception as the reason, so a buggy provider never takes the engine down.

Invariant: a provider's ``impl`` has exactly the native function's parameters (names, order, kinds,
defaults); :func:`signature_difference` enforces it at registration.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .platforms import Platform

__all__ = ["NATIVE", "Provider", "signature_difference"]

NATIVE = "native"

PlatformCheck = Callable[[Platform], "bool | str"]
ArgsCheck = Callable[..., "bool | str"]


@dataclass(frozen=True, slots=True)
class Provider:
    """One registered implementation of an op."""

    name: str  # provider name, e.g. "triton"; "native" is the op's own torch function
    impl: Callable[..., Any]  # same signature as the native function
    supported: PlatformCheck | None = None  # static platform check; None = runs everywhere
    supports_args: ArgsCheck | None = None  # per-call argument check; None = accepts all arguments
    batch_invariant: bool = False  # results for a row do not depend on the other rows of the batch

    def platform_reason(self, platform: Platform) -> str | None:
        """``None`` when the provider can run on ``platform``, else why not."""
        if self.supported is None:
            return None
        try:
            verdict = self.supported(platform)
        except Exception as exc:
            return f"platform check raised {type(exc).__name__}: {exc}"
        return _reason(verdict, f"not supported on {platform.kind}")

    def args_reason(self, *args: Any) -> str | None:
        """``None`` when the provider accepts ``args``, else why not."""
        if self.supports_args is None:
            return None
        try:
            verdict = self.supports_args(*args)
        except Exception as exc:
            return f"argument check raised {type(exc).__name__}: {exc}"
        return _reason(verdict, "arguments not supported")


def _reason(verdict: bool | str, default: str) -> str | None:
    if verdict is True:
        return None
    if isinstance(verdict, str) and verdict:
        return verdict
    return default


def _describe(param: inspect.Parameter) -> str:
    text = f"{param.name} ({param.kind.description})"
    if param.default is not inspect.Parameter.empty:
        text += f" = {param.default!r}"
    return text


def signature_difference(native: Callable[..., Any], impl: Callable[..., Any]) -> str | None:
    """Describe how ``impl``'s parameters differ from ``native``'s, or ``None`` when they match.

    Compared: names, order, kinds and defaults. Annotations are not compared (providers may spell types
    differently or omit them); the schema comes from the native function alone.
    """
    want = list(inspect.signature(native).parameters.values())
    got = list(inspect.signature(impl).parameters.values())
    for index in range(max(len(want), len(got))):
        if index >= len(got):
            return f"missing parameter #{index} {_describe(want[index])}"
        if index >= len(want):
            return f"extra parameter #{index} {_describe(got[index])}"
        w, g = want[index], got[index]
        if (w.name, w.kind, w.default) != (g.name, g.kind, g.default):
            return f"parameter #{index} is {_describe(g)}, expected {_describe(w)}"
    return None
