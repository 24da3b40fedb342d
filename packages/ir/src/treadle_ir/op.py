"""Declaring an IR op: ``@treadle_ir.op`` turns a plain torch function into a dispatching, compilable op.

The decorated function is at once the op's semantic spec, its ``native`` implementation, its fake (meta)
function and the reference tests compare providers against. Declaring ``name`` defines the torch custom op
``torch.ops.treadle_ir.<name>`` with a schema inferred from the signature, so Dynamo treats calls as opaque
nodes that the lowering pass (:mod:`treadle_ir.lowering`) later replaces.

An eager call walks the op's cached candidate list (see :mod:`treadle_ir.config` for where the priority
comes from) and runs the first provider whose ``supports_args`` accepts the arguments; native ends every
list. Under ``torch.compile`` the call becomes ``torch.ops.treadle_ir.<name>.default`` instead.

Invariants: no keyword-only parameters; ops that return ``None`` must name what they mutate
(``mutates_args``) and callers never use a donated input after an in-place call except through the mutated
tensors themselves; functional ops never return a view of an input.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from . import config, plugins, state
from .platforms import Platform, current_platform
from .provider import NATIVE, ArgsCheck, PlatformCheck, Provider, signature_difference

__all__ = ["NAMESPACE", "IrOp", "Resolution", "op"]

logger = logging.getLogger(__name__)

NAMESPACE = "treadle_ir"
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")

ExampleArgs = Callable[[torch.device, torch.dtype], tuple[Any, ...]]


class Resolution:
    """An op's priority list resolved against the platform: candidates in order, and why others were dropped."""

    __slots__ = ("candidates", "priority", "skipped", "source")

    def __init__(
        self,
        priority: tuple[str, ...],
        source: str,
        candidates: tuple[Provider, ...],
        skipped: dict[str, str],
    ) -> None:
        self.priority = priority  # provider names, most preferred first, native last
        self.source = source  # where the priority list came from
        self.candidates = candidates  # providers that passed the static checks, in priority order
        self.skipped = skipped  # provider name -> reason it is not a candidate


class IrOp:
    """One IR op: its native function, its torch custom op and its registered providers."""

    def __init__(
        self,
        native: Callable[..., Any],
        name: str,
        mutates_args: Sequence[str],
        example: ExampleArgs | None,
        inline_native: bool,
    ) -> None:
        self.name = name
        self.native = native
        self.mutates_args = tuple(mutates_args)
        self.example = example  # builds typical arguments for the dispatch report
        self.inline_native = (
            inline_native  # lowering may trace native into the graph (no data-dependent shapes)
        )
        self.signature = inspect.signature(native)
        for param in self.signature.parameters.values():
            if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
                raise ValueError(
                    f"IR op {name!r}: parameter {param.name!r} is {param.kind.description}; IR ops take "
                    "positional-or-keyword parameters only (torch schemas are inferred from them)"
                )
        self.schema = torch.library.infer_schema(native, mutates_args=self.mutates_args)
        self.returns_none = self.schema.endswith("-> ()")
        if self.returns_none and not self.mutates_args:
            raise ValueError(
                f"IR op {name!r} returns None but mutates nothing; name its outputs in mutates_args"
            )
        self.providers: dict[str, Provider] = {NATIVE: Provider(NATIVE, native, batch_invariant=True)}
        self._priority_stack: list[tuple[str, ...]] = []
        self._generation = -1
        self._candidates: tuple[Provider, ...] = ()
        self._provider_ops: dict[str, Any] = {}
        self.torch_op = self._define_torch_op(name, self._run)
        self.__doc__ = native.__doc__
        self.__wrapped__ = native
        state.register_op(self)

    # ----------------------------------------------------------------- torch custom op
    def _define_torch_op(self, qualname: str, kernel: Callable[..., Any]) -> Any:
        _LIB.define(qualname + self.schema)
        _LIB.impl(qualname, kernel, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{NAMESPACE}::{qualname}", self._fake, lib=_LIB)
        return getattr(getattr(torch.ops, NAMESPACE), qualname).default

    def _fake(self, *args: Any) -> Any:
        return None if self.returns_none else self.native(*args)

    def provider_op(self, provider: str) -> Any:
        """An opaque custom op ``treadle_ir::<op>__<provider>`` that always runs ``provider`` (lowering)."""
        if provider not in self._provider_ops:
            impl = self.providers[provider].impl
            self._provider_ops[provider] = self._define_torch_op(f"{self.name}__{provider}", impl)
        return self._provider_ops[provider]

    # ----------------------------------------------------------------- providers
    def register_impl(
        self,
        provider: str,
        supported: PlatformCheck | None = None,
        supports_args: ArgsCheck | None = None,
        batch_invariant: bool = False,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering ``impl`` as ``provider`` for this op (re-registering replaces it)."""
        if provider == NATIVE:
            raise ValueError(
                f"IR op {self.name!r}: provider name 'native' is reserved for the op's own function"
            )
        if not provider.isidentifier():
            raise ValueError(f"IR op {self.name!r}: provider name {provider!r} must be a Python identifier")

        def decorate(impl: Callable[..., Any]) -> Callable[..., Any]:
            difference = signature_difference(self.native, impl)
            if difference is not None:
                raise TypeError(
                    f"provider {provider!r} for IR op {self.name!r}: signature {inspect.signature(impl)} differs "
                    f"from the native {self.signature}: {difference}"
                )
            self.providers[provider] = Provider(provider, impl, supported, supports_args, batch_invariant)
            self._provider_ops.pop(provider, None)
            state.bump_generation()
            return impl

        return decorate

    def unregister_impl(self, provider: str) -> None:
        """Remove ``provider`` (tests, plugin teardown); unknown names raise ``ValueError``."""
        if provider == NATIVE or provider not in self.providers:
            raise ValueError(
                f"IR op {self.name!r}: cannot unregister {provider!r}; registered: {', '.join(self.providers)}"
            )
        del self.providers[provider]
        state.bump_generation()

    @contextlib.contextmanager
    def priority(self, providers: Sequence[str]) -> Iterator[None]:
        """Scope a priority list for this op to a ``with`` block (native is still the last resort)."""
        if isinstance(providers, str):
            raise ValueError(f"priority() takes a list of provider names, got the string {providers!r}")
        self._priority_stack.append(tuple(providers))
        state.bump_generation()
        try:
            yield
        finally:
            self._priority_stack.pop()
            state.bump_generation()

    # ----------------------------------------------------------------- dispatch
    def resolve(self, platform: Platform | None = None) -> Resolution:
        """Resolve the priority list against ``platform`` (default: this machine) and the active config."""
        plugins.load_plugins()
        platform = platform or current_platform()
        if self._priority_stack:
            priority, source = self._priority_stack[-1], f"ops.{self.name}.priority()"
        elif self.name in config.get_config().op_priority:
            priority, source = tuple(config.get_config().op_priority[self.name]), "IrConfig"
        elif self.name in (env := config.env_op_priority()):
            priority, source = env[self.name], "TREADLE_IR_OP_PRIORITY"
        else:
            priority, source = platform.default_priority, f"platform default ({platform.kind})"
        if NATIVE not in priority:
            priority = (*priority, NATIVE)
        batch_invariant = config.batch_invariant_enabled()
        candidates: list[Provider] = []
        skipped: dict[str, str] = {}
        for name in priority:
            provider = self.providers.get(name)
            if provider is None:
                skipped[name] = f"no provider {name!r} registered (registered: {', '.join(self.providers)})"
            elif batch_invariant and not provider.batch_invariant:
                skipped[name] = "not batch-invariant (batch-invariant mode is on)"
            elif (reason := provider.platform_reason(platform)) is not None:
                skipped[name] = reason
            else:
                candidates.append(provider)
        for name, provider in self.providers.items():
            if name not in priority:
                skipped[name] = f"not in the priority list {list(priority)} ({source})"
                if (reason := provider.platform_reason(platform)) is not None:
                    skipped[name] += f"; also {reason}"
        return Resolution(priority, source, tuple(candidates), skipped)

    def _refresh(self) -> tuple[Provider, ...]:
        resolution = self.resolve()
        self._candidates = resolution.candidates
        self._generation = state.generation
        logger.debug(
            "IR op %s: priority %s from %s; candidates %s; skipped %s",
            self.name,
            list(resolution.priority),
            resolution.source,
            [p.name for p in resolution.candidates],
            resolution.skipped,
        )
        return self._candidates

    def candidates(self) -> tuple[Provider, ...]:
        """Providers that passed the static checks, in priority order (cached until something changes)."""
        if self._generation == state.generation:
            return self._candidates
        return self._refresh()

    def select(self, *args: Any) -> Provider:
        """The provider an eager call with ``args`` would run."""
        for provider in self.candidates():
            if provider.supports_args is None or provider.args_reason(*args) is None:
                return provider
        return self.providers[NATIVE]

    def explain(self, *args: Any) -> tuple[Provider, dict[str, str]]:
        """The provider chosen for ``args`` and, for every other provider, why it was not."""
        resolution = self.resolve()
        skipped = dict(resolution.skipped)
        chosen = self.providers[NATIVE]
        for provider in resolution.candidates:
            reason = provider.args_reason(*args)
            if reason is None:
                chosen = provider
                break
            skipped[provider.name] = reason
        remaining = [p.name for p in resolution.candidates]
        for name in remaining[remaining.index(chosen.name) + 1 :]:
            skipped[name] = f"lower priority than {chosen.name!r}"
        return chosen, skipped

    def dispatch(self, *args: Any) -> Any:
        """Run the first candidate accepting ``args`` (the eager path; also the custom op's kernel)."""
        candidates = self._candidates if self._generation == state.generation else self._refresh()
        for provider in candidates:
            check = provider.supports_args
            if check is None or provider.args_reason(*args) is None:
                return provider.impl(*args)
        return self.native(*args)

    _run = dispatch

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            args = self.signature.bind(*args, **kwargs).args
        if torch.compiler.is_compiling():
            return self.torch_op(*args)
        return self.dispatch(*args)

    def __repr__(self) -> str:
        return f"IrOp({self.name}{self.signature}, providers={list(self.providers)})"


def op(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    mutates_args: Sequence[str] = (),
    example: ExampleArgs | None = None,
    inline_native: bool = True,
) -> Any:
    """Declare an IR op from its native torch function: ``@op`` or ``@op(mutates_args=("x",), ...)``.

    ``example(device, dtype)`` builds typical arguments (used by the dispatch report). ``inline_native=False``
    keeps the native implementation opaque under compile (for data-dependent natives).
    """

    def decorate(native: Callable[..., Any]) -> IrOp:
        return IrOp(native, name or native.__name__, mutates_args, example, inline_native)

    return decorate(fn) if fn is not None else decorate
