"""torch.compile lowering: replace each IR node with the implementation dispatch would choose for it.

Under Dynamo an IR op call becomes one opaque node, ``torch.ops.treadle_ir.<op>.default``, carrying fake
tensors in ``node.meta``. :func:`lower_ir_ops` runs the op's eager selection (:meth:`IrOp.select`) on those
fake arguments and rewrites the node:

* ``native`` (and the op allows inlining) -> the native Python function itself; AOTAutograd traces through
  it, so Inductor sees plain aten ops and can fuse them with their neighbours;
* any other provider, or a native that must stay opaque -> ``torch.ops.treadle_ir.<op>__<provider>``, a
  custom op bound to that provider only (no per-call dispatch left in the compiled code).

``compile_backend`` is a Dynamo backend doing this and then handing the graph to Inductor
(``make_backend("aot_eager")`` for another inner backend). Invariant: eager and compiled runs choose the
same provider for the same argument metadata, because both go through ``select``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from . import state
from .op import IrOp
from .provider import NATIVE

__all__ = ["LoweredNode", "compile_backend", "last_lowering", "lower_ir_ops", "make_backend"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoweredNode:
    """One IR node rewritten by the lowering pass."""

    node: str  # FX node name
    op: str  # IR op name
    provider: str  # provider chosen for the node's fake inputs
    inlined: bool  # True when the native function was traced into the graph


last_lowering: list[LoweredNode] = []  # records of the most recent lower_ir_ops call (tests, logging)


def _ir_op_for(target: Any) -> IrOp | None:
    for ir_op in state.all_ops():
        if target is ir_op.torch_op or target is getattr(ir_op.torch_op, "overloadpacket", None):
            return ir_op
    return None


def _fake(value: Any) -> Any:
    if isinstance(value, torch.fx.Node):
        meta = value.meta
        return meta["example_value"] if "example_value" in meta else meta.get("val")
    if isinstance(value, (list, tuple)):
        return type(value)(_fake(v) for v in value)
    return value


def lower_ir_ops(gm: torch.fx.GraphModule) -> list[LoweredNode]:
    """Rewrite every IR node of ``gm`` in place to its chosen implementation; return what was done."""
    records: list[LoweredNode] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        ir_op = _ir_op_for(node.target)
        if ir_op is None:
            continue
        bound = ir_op.signature.bind(*node.args, **node.kwargs)
        fake_args = tuple(_fake(a) for a in bound.args)
        if any(a is None for a, n in zip(fake_args, bound.args, strict=True) if isinstance(n, torch.fx.Node)):
            raise RuntimeError(
                f"IR lowering: node {node.name} ({ir_op.name}) has an input without fake metadata"
            )
        provider = ir_op.select(*fake_args)
        inline = provider.name == NATIVE and ir_op.inline_native
        node.target = ir_op.native if inline else ir_op.provider_op(provider.name)
        node.args, node.kwargs = tuple(bound.args), {}
        records.append(LoweredNode(node.name, ir_op.name, provider.name, inline))
    gm.graph.lint()
    gm.recompile()
    last_lowering[:] = records
    for record in records:
        logger.debug(
            "IR lowering: %s (%s) -> %s%s",
            record.node,
            record.op,
            record.provider,
            " (inlined)" if record.inlined else "",
        )
    return records


def make_backend(inner: str | Callable[..., Any] = "inductor") -> Callable[..., Any]:
    """A Dynamo backend that lowers IR ops, then compiles with ``inner`` (a backend name or callable)."""

    def backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Any:
        lower_ir_ops(gm)
        compiler = torch._dynamo.lookup_backend(inner) if isinstance(inner, str) else inner
        return compiler(gm, list(example_inputs), **kwargs)

    return backend


compile_backend = make_backend("inductor")
