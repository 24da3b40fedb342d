"""The fp8 experts' activation quantization runs the kernels package's providers even where no entry point
registered them (treadle_moe run from source paths, as on the GPU machine): importing the fp8 path imports
treadle_kernels. Checked in a fresh interpreter with plugin loading off, so entry points cannot do it instead."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import treadle_moe.experts.triton_fp8
from treadle_ir import ops
for op in (ops.quantize_fp8_rows, ops.quantize_fp8_groups):
    print(op.name, sorted(op.providers))
"""


def test_fp8_path_registers_the_triton_quantization_providers() -> None:
    env = {"TREADLE_IR_DISABLE_PLUGINS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    for line in lines:
        assert "'triton'" in line, line
