"""The single `requant` console script.

Each component owns its sub-commands in `<component>/cli.py` through a
`register(subparsers)` function; this module only wires them together, importing
lazily so `requant --help` stays fast and one broken optional dependency does not
take down every command.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

# Order is the order shown in --help.
COMMAND_MODULES = [
    "requant.quantizer.cli",
    "requant.storage.cli",
    "requant.hooks.cli",
    "requant.orchestrator.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="requant",
        description="Capture DeepSeek MTP-layer inputs from live servers and GPTQ the MTP experts.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is None:  # component not built yet
            continue
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from requant.storage.schema import DamagedInputError, StoreError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, StoreError, DamagedInputError) as e:
        # Bad or damaged input: one clear line, no traceback (REQUANT_DEBUG=1 for the traceback).
        if os.environ.get("REQUANT_DEBUG"):
            raise
        print(f"requant: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
