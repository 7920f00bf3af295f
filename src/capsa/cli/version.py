"""``capsa version``: what runc prints, plus the guest parts."""

from __future__ import annotations

import argparse
from typing import Any

from capsa import __version__
from capsa.cli.context import Context
from capsa.cli.spec import OCI_VERSION


def add_parser(verbs: Any, name: str) -> None:
    p = verbs.add_parser(name, help="print the version")
    p.set_defaults(execute=execute)


def execute(args: argparse.Namespace, ctx: Context) -> int:
    print(f"capsa version {__version__}\nspec: {OCI_VERSION}")
    return 0
