"""The `edgecut` command. Each subcommand lives in its own module in this package and exposes
`register(subparsers)`, which adds a parser whose `func(args) -> int` runs it. Modules are found
automatically, so a new command is a new file.

Errors a user can cause (`EdgecutError`) print one line and exit with code 2, no traceback.
Every parser prints its defaults in `--help` (`HelpFormatter`) and a short usage line (the
options are listed below it); docs/cli.md is these help texts (`python -m edgecut.docgen`).
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from edgecut import __version__
from edgecut.errors import EdgecutError


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows every default: an option whose help does not already give its default
    gets "(default: X)" appended; options without one (None, False, []) get nothing."""

    def __init__(self, prog, indent_increment=2, max_help_position=32, width=None):
        super().__init__(prog, indent_increment, max_help_position, width)

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if not action.option_strings or "default" in text or d in (None, False, argparse.SUPPRESS) or d == []:
            return text
        return f"{text} (default: %(default)s)"


def _short_usage(p: argparse.ArgumentParser) -> str:
    """'edgecut CMD [options] REQUIRED... POSITIONAL...': the full list follows in the help."""
    parts = [p.prog, "[options]"]
    for a in p._actions:
        if a.option_strings and a.required:
            parts.append(f"{a.option_strings[-1]} {a.metavar or a.dest.upper()}")
    for a in p._actions:
        if not a.option_strings:
            name = a.metavar or a.dest
            parts.append(f"{name} [{name} ...]" if a.nargs == "+" else name)
    return " ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgecut", formatter_class=HelpFormatter,
        description="Split a PyTorch model between a device and an edge server to meet a deadline.",
        epilog="`edgecut COMMAND --help` lists a command's options; docs/cli.md has them all.")
    parser.add_argument("-V", "--version", action="version", version=f"edgecut {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    for p in sub.choices.values():
        p.formatter_class = HelpFormatter
        if p.usage is None:
            p.usage = _short_usage(p)
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
