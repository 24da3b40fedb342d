"""``python -m treadle_ir report``: print the dispatch report for this machine.

``--load MODULE`` imports provider modules first (e.g. ``--load treadle_kernels``), like the engine does.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m treadle_ir", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="print which provider each IR op dispatches to, and why")
    rep.add_argument(
        "--load",
        action="append",
        default=None,
        help="import this provider module first (repeatable; default: treadle_kernels when installed)",
    )
    args = parser.parse_args(argv)
    modules = args.load if args.load is not None else ["treadle_kernels"]
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            if args.load is not None:
                raise SystemExit(f"cannot import provider module {module!r}: {exc}") from exc
    sys.stdout.write(report() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
