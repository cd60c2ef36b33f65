"""The `edgecut` command. Each subcommand lives in its own module in this package and exposes
`register(subparsers)`, which adds a parser whose `func(args) -> int` runs it. Modules are found
automatically, so a new command is a new file.

Errors a user can cause (`EdgecutError`) print one line and exit with code 2, no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from edgecut import __version__
from edgecut.errors import EdgecutError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgecut",
        description="Split a PyTorch model between a device and an edge server to meet a deadline.")
    parser.add_argument("--version", action="version", version=f"edgecut {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads sleep rather than spin, so torch (training exits) does not starve the
    # other processes a command starts (edge server, link emulator) on a small machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except EdgecutError as e:
        print(f"edgecut {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edgecut {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
