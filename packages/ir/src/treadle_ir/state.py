"""Process-wide IR state shared by ops, config and plugins: the op registry and a generation counter.

Dispatch caches each op's resolved candidate list together with the generation it was computed at; anything
that can change a resolution (registering a provider, changing the config, entering a priority context,
loading plugins) calls :func:`bump_generation`. Reading the counter is the only per-call cost of staleness.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .op import IrOp

__all__ = ["all_ops", "bump_generation", "generation", "get_op", "register_op", "validate_op_names"]

_ops: dict[str, IrOp] = {}
generation = 0


def bump_generation() -> None:
    """Invalidate every op's cached dispatch resolution (public as ``treadle_ir.refresh``).

    Environment variables are read when an op resolves (first call, or after any change); call this after
    changing ``TREADLE_IR_OP_PRIORITY`` / ``TREADLE_BATCH_INVARIANT`` in a running process.
    """
    global generation
    generation += 1


def register_op(op: IrOp) -> None:
    if op.name in _ops:
        raise ValueError(f"IR op {op.name!r} is already declared; op names must be unique")
    _ops[op.name] = op
    bump_generation()


def all_ops() -> list[IrOp]:
    """Every declared op, in declaration order."""
    return list(_ops.values())


def get_op(name: str) -> IrOp:
    try:
        return _ops[name]
    except KeyError:
        raise ValueError(f"unknown IR op {name!r}; declared ops: {', '.join(sorted(_ops))}") from None


def validate_op_names(names: Iterable[str], source: str) -> None:
    """Raise naming ``source`` when it mentions an op that was never declared."""
    unknown = sorted(set(names) - set(_ops))
    if unknown:
        raise ValueError(
            f"{source} names unknown IR op(s) {', '.join(map(repr, unknown))}; declared ops: "
            f"{', '.join(sorted(_ops))}"
        )
