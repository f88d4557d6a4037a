"""Subcommands from a table of modules, each exposing ``HELP``, ``add_arguments(parser)`` and ``run(args)``."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Mapping


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def add_commands(
    parser: argparse.ArgumentParser, modules: Mapping[str, str], *, dest: str, metavar: str, run_attr: str
) -> None:
    """One required subcommand per ``name -> module`` (in table order); the chosen module's ``run`` lands in
    ``args.<run_attr>``. A module that does not import is an error, not a missing command."""
    sub = parser.add_subparsers(dest=dest, metavar=metavar, required=True)
    for name, module_name in modules.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP, formatter_class=Formatter)
        module.add_arguments(p)
        p.set_defaults(**{run_attr: module.run})
