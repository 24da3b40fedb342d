"""The `treadle` command line: serve, chat, complete, bench."""

from __future__ import annotations

import argparse
import sys

import treadle


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="treadle", description="treadle: LLM inference and serving engine")
    parser.add_argument("--version", action="version", version=f"treadle {treadle.__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
