"""The `treadle` command line: serve, chat, complete, bench.

Subcommands live in their own modules (cli_serve, cli_chat, bench/) and import their heavy dependencies
only when they run, so `treadle --version` and `treadle --help` are instant.
"""

from __future__ import annotations

import argparse
import logging
import sys

import treadle


def build_parser() -> argparse.ArgumentParser:
    from treadle import cli_chat, cli_serve
    from treadle.bench import offline, serve

    parser = argparse.ArgumentParser(prog="treadle", description="treadle: LLM inference and serving engine")
    parser.add_argument("--version", action="version", version=f"treadle {treadle.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="serve a model over the OpenAI and Anthropic HTTP APIs")
    cli_serve.add_serve_args(p)
    p.set_defaults(func=cli_serve.run_serve)

    p = sub.add_parser("chat", help="chat with a running server (streams replies)")
    cli_chat.add_client_args(p, chat=True)
    p.set_defaults(func=cli_chat.run_chat)

    p = sub.add_parser("complete", help="complete prompts with a running server")
    cli_chat.add_client_args(p, chat=False)
    p.set_defaults(func=cli_chat.run_complete)

    bench = sub.add_parser("bench", help="benchmarks that print what `vllm bench` prints")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    p = bench_sub.add_parser("throughput", help="offline throughput on random prompts")
    offline.add_throughput_args(p)
    p.set_defaults(func=lambda a: (offline.run_throughput(a), 0)[1])
    p = bench_sub.add_parser("latency", help="offline latency of one batch")
    offline.add_latency_args(p)
    p.set_defaults(func=lambda a: (offline.run_latency(a), 0)[1])
    p = bench_sub.add_parser("serve", help="load-test a running OpenAI-compatible server")
    serve.add_serve_args(p)
    p.set_defaults(func=serve.main_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["--version"], ["-V"]):
        print(f"treadle {treadle.__version__}")
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    quiet = args.command in ("chat", "complete")  # their stdout is the conversation
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(levelname)s %(asctime)s %(name)s: %(message)s",
        datefmt="%m-%d %H:%M:%S",
    )
    from treadle_engine_core.client import EngineStartError

    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # a user error: say what to fix, no traceback
        logging.getLogger("treadle").error("%s", e)
        return 2
    except EngineStartError as e:  # the engine process logged its own details above
        if e.interrupted:
            return 130
        logging.getLogger("treadle").error("%s", e)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
