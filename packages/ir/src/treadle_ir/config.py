"""Provider-priority configuration: :class:`IrConfig`, its text form, and the process-wide active config.

Where an op's priority list comes from, highest first:

1. ``with ops.<op>.priority([...])`` (tests, scoped to the block);
2. the active :class:`IrConfig` (``set_config`` / ``use_config``; the CLI's ``--ir-op-priority`` builds one);
3. ``TREADLE_IR_OP_PRIORITY="rms_norm=triton,native;silu_and_mul=native"``;
4. the platform default (cpu: native; cuda: triton, native).

Each level overrides only the ops it names. ``native`` is always appended as the last resort, so a list never
ends without an implementation. Batch-invariant mode is on when the config or ``TREADLE_BATCH_INVARIANT`` says so.

Invariant: every change to the active config bumps :data:`state.generation`, which invalidates the per-op
dispatch caches; eager calls never re-parse configuration.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from . import envs, state

__all__ = ["IrConfig", "get_config", "parse_op_priority", "set_config", "use_config"]


def parse_op_priority(text: str, source: str = "--ir-op-priority") -> dict[str, tuple[str, ...]]:
    """Parse ``"op=prov,prov;op=prov"`` into ``{op: (prov, ...)}``; errors name ``source`` and the bad part."""
    result: dict[str, tuple[str, ...]] = {}
    for raw_item in text.split(";"):
        item = raw_item.strip()
        if not item:
            continue
        op_name, sep, providers = item.partition("=")
        names = tuple(p.strip() for p in providers.split(",") if p.strip())
        if not sep or not op_name.strip() or not names:
            raise ValueError(
                f"{source}: cannot parse {item!r} in {text!r}; expected 'op=provider[,provider...]' items "
                "separated by ';', e.g. 'rms_norm=triton,native;silu_and_mul=native'"
            )
        result[op_name.strip()] = names
    return result


@dataclass(frozen=True)
class IrConfig:
    """User choices for IR dispatch (composed into the engine's config by higher layers)."""

    # op name -> provider names, most preferred first; ops not named keep env / platform defaults
    op_priority: Mapping[str, Sequence[str]] = field(default_factory=dict)
    # keep only providers registered with batch_invariant=True (native always stays)
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        normalized: dict[str, tuple[str, ...]] = {}
        for op_name, providers in self.op_priority.items():
            if isinstance(providers, str):
                raise ValueError(
                    f"IrConfig.op_priority[{op_name!r}] = {providers!r} is a string; give a list of provider "
                    f"names, e.g. [{providers!r}, 'native']"
                )
            names = tuple(providers)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ValueError(
                    f"IrConfig.op_priority[{op_name!r}] = {providers!r}: expected a non-empty list of provider "
                    "names such as ['triton', 'native']"
                )
            normalized[op_name] = names
        object.__setattr__(self, "op_priority", normalized)

    @classmethod
    def from_cli(cls, text: str, batch_invariant: bool = False) -> IrConfig:
        """Build from the ``--ir-op-priority`` text form."""
        return cls(op_priority=parse_op_priority(text), batch_invariant=batch_invariant)


_active: IrConfig = IrConfig()


def get_config() -> IrConfig:
    """The active config set with :func:`set_config` (an empty ``IrConfig()`` by default)."""
    return _active


def set_config(config: IrConfig) -> None:
    """Make ``config`` the active IR config for this process; unknown op names raise ``ValueError``."""
    global _active
    state.validate_op_names(config.op_priority, "IrConfig.op_priority")
    _active = config
    state.bump_generation()


@contextlib.contextmanager
def use_config(config: IrConfig) -> Iterator[IrConfig]:
    """Scope ``config`` to a ``with`` block (tests); the previous config is restored on exit."""
    previous = _active
    set_config(config)
    try:
        yield config
    finally:
        set_config(previous)


def env_op_priority() -> dict[str, tuple[str, ...]]:
    """``TREADLE_IR_OP_PRIORITY`` parsed and validated (unknown ops raise naming the variable)."""
    parsed = parse_op_priority(envs.TREADLE_IR_OP_PRIORITY(), "TREADLE_IR_OP_PRIORITY")
    state.validate_op_names(parsed, "TREADLE_IR_OP_PRIORITY")
    return parsed


def batch_invariant_enabled() -> bool:
    """True when the active config or ``TREADLE_BATCH_INVARIANT`` asks for batch-invariant providers."""
    return _active.batch_invariant or envs.TREADLE_BATCH_INVARIANT()
