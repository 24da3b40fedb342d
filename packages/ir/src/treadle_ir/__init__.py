"""treadle_ir — the op vocabulary: ops declared once as torch functions, dispatched and lowered per platform.

``from treadle_ir import ops``; ``ops.rms_norm(x, weight, 1e-6)`` runs the provider chosen for this
platform and configuration. Providers register with ``ops.<op>.register_impl(...)``; torch.compile users
pass ``backend=treadle_ir.compile_backend`` (or call :func:`lower_ir_ops` in their own backend) so each IR
node is replaced by the implementation dispatch would pick. See README.md.
"""

from __future__ import annotations

from . import envs, ops
from .config import IrConfig, get_config, parse_op_priority, set_config, use_config
from .lowering import compile_backend, lower_ir_ops, make_backend
from .op import IrOp, op
from .platforms import Platform, current_platform
from .provider import NATIVE, Provider
from .report import report
from .state import bump_generation as refresh

platform: Platform = current_platform()

__all__ = [
    "NATIVE",
    "IrConfig",
    "IrOp",
    "Platform",
    "Provider",
    "compile_backend",
    "envs",
    "get_config",
    "lower_ir_ops",
    "make_backend",
    "op",
    "ops",
    "parse_op_priority",
    "platform",
    "refresh",
    "report",
    "set_config",
    "use_config",
]
