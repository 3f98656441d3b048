"""Command line of data_shards: ``python -m data_shards <command> ...``.

Each command is one entry of COMMANDS: (help line, function adding its
arguments to a parser, function running it from the parsed arguments and
returning the exit code). Adding a command is adding an entry.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from data_shards.cli import (
    add_build_arguments,
    add_encode_arguments,
    add_procedural_arguments,
    run_build,
    run_encode,
    run_procedural,
)

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

COMMANDS: dict[str, Command] = {
    "build": ("video files -> WebDataset shards of H.264 clips", add_build_arguments, run_build),
    "encode": ("moved: python -m pretrain.encode --config PRESET_OR_TOML ...", add_encode_arguments, run_encode),
    "procedural": (
        "procedural videos -> clip shards for pre-training (unlabeled, seeds apart from the eval sets')",
        add_procedural_arguments,
        run_procedural,
    ),
}


def add_global_flags(parser: argparse.ArgumentParser, default: object) -> None:
    """Flags accepted before and after the command name (``-v build ...`` and ``build ... -v``).

    The top-level parser sets the real default; each command's parser adds the
    same flags with ``argparse.SUPPRESS``, so a flag left out after the command
    does not overwrite one given before it.
    """
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="log at INFO level (default: off, WARNING)"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed command line; exits 2 with argparse's usage error on arguments no command takes."""
    parser = argparse.ArgumentParser(prog="python -m data_shards", description=__doc__.splitlines()[0])
    add_global_flags(parser, default=False)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_line, add_arguments, run) in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_line, description=help_line)
        add_global_flags(subparser, default=argparse.SUPPRESS)
        add_arguments(subparser)
        subparser.set_defaults(run=run)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(namespace, "any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return namespace


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command named in ``argv`` (default: sys.argv[1:]); returns its exit code."""
    namespace = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if namespace.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    return namespace.run(namespace)


if __name__ == "__main__":
    sys.exit(main())
