"""The ``commpress`` command line.

Each subcommand lives in its own module, which exposes ``add_parser(subparsers)``:
it adds its parser with ``subparsers.add_parser(name, ...)`` and sets
``func=<callable(args) -> int>`` as a default. This module only builds the
top-level parser from `SUBCOMMANDS` and dispatches; to add a subcommand, write
``commpress/cli_<name>.py`` and append its module name to `SUBCOMMANDS`.

Exit status: what the subcommand returns (0 on success), 1 when it raises a
`CommpressError` (the message goes to stderr), 2 for bad arguments (argparse).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .errors import CommpressError

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

#: Modules that each contribute one subcommand through ``add_parser(subparsers)``.
SUBCOMMANDS: tuple[str, ...] = ("commpress.cli_codecs", "commpress.cli_run", "commpress.bench.cli")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand in `SUBCOMMANDS`."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="commpress",
        description="Compressed collectives for torch.distributed: tools.",
    )
    parser.add_argument("--version", action="version", version=f"commpress {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CommpressError as exc:
        print(f"commpress {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"commpress {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
