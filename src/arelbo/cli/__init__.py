"""The ``arelbo`` command. Thin: each subcommand lives in the module that does the work and exposes
``add_arguments(parser)`` and ``run(args) -> int``; this file only routes, importing only the module of the
command given (``arelbo --help`` imports none), and command modules keep heavy imports (torch, Lightning,
matplotlib) inside ``run``, so help answers fast and a core install (no extras) can still run it."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). Adding a command is one line here plus the module's two functions.
COMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("arelbo.cli.eval", "evaluate a trained run: collapse diagnostics, -ELBO / IS-NLL, samplers + FID -> metrics.json"),
    "features": ("arelbo.cli.features", "train / inspect the MNIST feature network used for FID (mnist-features)"),
    "train": ("arelbo.cli.train", "train a VAE from a preset / YAML config / --set overrides, or --resume a run"),
    "sample": ("arelbo.cli.sample", "write a PNG grid of samples (prior, or a sampler fitted by eval) from a trained run"),
    "reconstruct": ("arelbo.cli.reconstruct", "write data above their reconstructions from a trained run (PNG)"),
    "demo": ("arelbo.cli.demo", "AR-ELBO vs sigma^2 = 1 on MNIST in a few CPU minutes: samples and a summary"),
    "linear": ("arelbo.cli.linear", "train linear VAEs on Gaussian data and compare with the exact closed forms"),
    "compare": ("arelbo.cli.compare", "train + evaluate several sigma^2 policies x seeds, aggregate, report.md/.html"),
    "sweep": ("arelbo.cli.sweep", "fixed sigma^2 over a log grid beside ar: collapse vs sigma^2, report.md/.html"),
}


# The optional dependency groups of pyproject.toml that provide each third-party module the commands import:
# a command whose extra is not installed stops with one line naming it.
EXTRA_OF_MODULE: dict[str, str] = {
    "lightning": "train",
    "tensorboard": "train",
    "tensorboardX": "train",
    "tqdm": "train",
    "PIL": "train",
    "torchmetrics": "eval",
    "sklearn": "eval",
    "threadpoolctl": "eval",
    "matplotlib": "report",
    "scipy": "report",
    "zarr": "mnist",
    "pure_ml": "mnist",
}


def build_parser(commands=None) -> argparse.ArgumentParser:
    """The parser; only the commands in ``commands`` (default: all) import their module and get their arguments,
    so ``arelbo --help`` and ``arelbo CMD ...`` import nothing else (no torch for the top-level help)."""
    from arelbo import __version__

    parser = argparse.ArgumentParser(prog="arelbo", description="Gaussian VAEs without posterior collapse (AR-ELBO).")
    parser.add_argument("--version", action="version", version=f"arelbo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if commands is None or name in commands:
            importlib.import_module(module).add_arguments(p)
    return parser


def _missing_extra(err: ModuleNotFoundError) -> str | None:
    root = (err.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(root)
    if extra is None:
        return None
    return f"this command needs the {extra!r} extra ({root} is not installed): pip install 'arelbo[{extra}]'"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser({command} if command in COMMANDS else set())
    except ModuleNotFoundError as err:  # a command whose parser needs a missing extra
        message = _missing_extra(err)
        if message is None:
            raise
        print(f"arelbo {command}: error: {message}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # user-facing problems: one clear line, no traceback
        print(f"arelbo {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        message = _missing_extra(err)
        if message is None:
            raise
        print(f"arelbo {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
