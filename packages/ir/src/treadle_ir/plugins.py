"""Out-of-tree providers: entry points in the group ``treadle.kernels``, loaded lazily and at most once.

A package advertises ``[project.entry-points."treadle.kernels"] myname = "my_pkg.treadle_plugin"``; the
target is a module (importing it registers providers) or a callable (called with no arguments). Loading
happens on the first dispatch resolution or report, never at ``import treadle_ir``. A plugin that fails
to import or raises is reported with a ``RuntimeWarning`` and a log line naming it; the engine keeps going
with the providers it has. ``TREADLE_IR_DISABLE_PLUGINS=1`` skips plugin loading.
"""

from __future__ import annotations

import importlib.metadata
import logging
import warnings
from collections.abc import Iterable

from . import envs, state

__all__ = ["ENTRY_POINT_GROUP", "load_plugins", "loaded_plugins"]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "treadle.kernels"

_loaded = False
_results: dict[str, str] = {}  # plugin name -> "loaded" or the error


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def load_plugins(force: bool = False) -> dict[str, str]:
    """Load every ``treadle.kernels`` entry point once; return ``{plugin: "loaded" | error}``."""
    global _loaded
    if _loaded and not force:
        return _results
    _loaded = True
    if envs.TREADLE_IR_DISABLE_PLUGINS():
        logger.info("TREADLE_IR_DISABLE_PLUGINS=1: not loading %s entry points", ENTRY_POINT_GROUP)
        return _results
    for entry_point in _entry_points():
        label = f"{entry_point.name} ({entry_point.value})"
        try:
            target = entry_point.load()
            if callable(target):
                target()
        except Exception as exc:
            _results[entry_point.name] = f"failed: {type(exc).__name__}: {exc}"
            message = (
                f"treadle IR plugin {label} from entry-point group {ENTRY_POINT_GROUP!r} failed to load "
                f"({type(exc).__name__}: {exc}); its providers are unavailable, built-in ones are used"
            )
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        else:
            _results[entry_point.name] = "loaded"
            logger.info("loaded treadle IR plugin %s", label)
    state.bump_generation()
    return _results


def loaded_plugins() -> dict[str, str]:
    """Plugins seen so far and their status (empty before the first dispatch)."""
    return dict(_results)
