"""The ``arelbo`` command. Thin: each subcommand lives in the module that does the work and exposes
``add_arguments(parser)`` and ``run(args) -> int``; this file only routes. Command modules keep heavy imports
(Lightning, matplotlib) inside ``run`` so that ``arelbo --help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). Adding a command is one line here plus the module's two functions.
COMMANDS: dict[str, tuple[str, str]] = {
    "linear": ("arelbo.linear_cli", "train linear VAEs on Gaussian data and compare with the exact closed forms"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arelbo", description="Gaussian VAEs without posterior collapse (AR-ELBO).")
    from arelbo import __version__

    parser.add_argument("--version", action="version", version=f"arelbo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # user-facing problems: one clear line, no traceback
        print(f"arelbo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
