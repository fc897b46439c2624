"""The ``evoprune`` command line.

Each command group lives with the code it drives and registers itself through a
``register_cli(subparsers)`` function listed in ``_COMMAND_MODULES``; every
command handler returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ._logging import configure_logging

# module (relative to evoprune) -> defines register_cli(subparsers)
_COMMAND_MODULES: tuple[str, ...] = (
    "._reference", ".storage._cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evoprune",
        description="Compress pretrained causal LMs by evolutionary architecture search.",
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING, ...")
    parser.add_argument("--log-json", action="store_true", help="emit logs as JSON lines on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMAND_MODULES:
        importlib.import_module(module, __package__).register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, as_json=args.log_json or None)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
