"""The `strata` command: builds argparse from the subcommand modules and turns StrataError into one line."""

from __future__ import annotations

import argparse
import importlib
import sys

import strata
from strata.errors import StrataError

# Each module defines `register(subparsers)` which adds its parser(s) and sets `func=run_fn`.
COMMAND_MODULES = [
    "strata.commands.generate",
    "strata.commands.info",
    "strata.commands.eval",
    "strata.commands.convert",
    "strata.commands.analyze",
    "strata.commands.serve",
    "strata.commands.bench_serve",
    "strata.commands.sim_cache",
    "strata.commands.quantize",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata", description="Strata: LLM/MoE inference on modest hardware")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors (anywhere on the line)")
    parser.add_argument("--version", action="version", version=f"strata {strata.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a command module not written yet
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args([a for a in argv if a != "--debug"])
    try:
        rc = args.func(args)
    except StrataError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
