"""treadle: an LLM inference and serving engine.

The meta-package pins the six treadle packages, re-exports the offline API and owns the `treadle` CLI.
"""

from __future__ import annotations

from importlib.metadata import version as _version

__version__ = _version("treadle")

__all__ = ["__version__"]
