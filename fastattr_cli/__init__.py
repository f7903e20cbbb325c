"""The ``fastattr`` command line, at the top of the layering: each area registers its own
subcommands (``register(commands)`` in its ``cli.py``), and each command imports its machinery
lazily, so ``--help`` is instant. ``python -m fastattr_cli`` runs it too (e.g. under
``accelerate launch`` or ``torchrun``)."""

from __future__ import annotations

import argparse
import sys

import fastattr_distill.cli
import fastattr_hook.cli
import fastattr_sandbox.cli
import fastattr_teacher.cli
import index_tools.cli
import integrations.cli
from fastattr_hook import __version__
from fastattr_hook.errors import FastattrError

AREAS = (fastattr_sandbox.cli, index_tools.cli, fastattr_hook.cli, integrations.cli, fastattr_teacher.cli,
         fastattr_distill.cli)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastattr", description="fastattr: which training images made this "
                                     "image, in milliseconds. Each command has its own --help.")
    parser.add_argument("--version", action="version", version=f"fastattr {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for area in AREAS:
        area.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):  # a file name that is not UTF-8 prints as its own bytes, not as a crash
        sys.stdout.reconfigure(errors="surrogateescape")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FastattrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command (with --resume where offered) to continue", file=sys.stderr)
        return 130

