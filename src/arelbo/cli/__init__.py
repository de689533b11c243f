"""The ``arelbo`` command. Thin: each subcommand lives in the module that does the work and exposes
``add_arguments(parser)`` and ``run(args) -> int``; this file only routes, importing only the module of the
command given (``arelbo --help`` imports none), and command modules keep heavy imports (torch, Lightning,
matplotlib) inside ``run``, so help answers fast and a core install (no extras) can still run it."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import pickle
import sys
import traceback

__all__ = ["main", "COMMANDS"]

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


class CommandError(Exception):
    """An expected failure of a command (bad input, missing file, unusable device): the CLI prints its message
    as one line and exits with ``exit_code``. ValueError, OSError and a few library errors count as expected
    too (see :func:`expected_message`); anything else is a bug and keeps its traceback."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


# What to do about an OSError, by errno (the message already names the path).
_OS_HINTS = {
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another path",
    errno.EISDIR: "that is a folder: give a file path",
    errno.ENOSPC: "free some disk space or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
}
# Library exceptions that report a user's setting, matched by class name so that nothing is imported here.
_EXPECTED_NAMES = {"MisconfigurationException": "the trainer refused the train.* settings (check train.accelerator, "
                                                "train.devices, train.strategy; cpu or auto always work)"}


def expected_message(err: BaseException) -> str | None:
    """The one-line message for an expected failure, or None for a bug (which keeps its traceback)."""
    if isinstance(err, (CommandError, ValueError)):
        text = str(err)
    elif isinstance(err, OSError):
        if err.filename is not None and err.strerror:
            where = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 else "")
            hint = _OS_HINTS.get(err.errno)
            text = f"{err.strerror}: {where}" + (f"; {hint}" if hint else "")
        else:
            text = str(err) or type(err).__name__
    elif isinstance(err, ModuleNotFoundError) and _missing_extra(err) is not None:
        text = _missing_extra(err)
    elif isinstance(err, pickle.UnpicklingError):
        text = ("a file could not be loaded: it is damaged, or holds objects other than tensors (refused: loading "
                "those could run code)")
    elif type(err).__name__ in _EXPECTED_NAMES:
        text = f"{_EXPECTED_NAMES[type(err).__name__]}: {err}"
    else:
        return None
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " ".join(lines[:1]) if lines else type(err).__name__


def check_output_file(path, flag: str, example: str = "out.png") -> None:
    """Refuse, before any work, an output file path a command could not write at the end: a folder, a path under
    a file, or one whose nearest existing folder is not writable (missing folders are made when writing)."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise CommandError(f"{flag} {path} is a folder: give a file name, e.g. {path / example}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CommandError(f"{flag} {path}: {parent} is a file, not a folder; choose another path")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise CommandError(f"{flag} {path}: the folder {parent} is not writable; choose another path")
            break


def handle_error(command: str, err: BaseException, debug: bool = False) -> int:
    """The one place the CLI turns an exception into output and an exit code.

    Expected failures: ``arelbo COMMAND: error: MESSAGE`` on one line (exit 2, or the error's own code).
    Ctrl-C: exit 130. Anything else is a bug: its traceback, then a line saying so (exit 1). ``--debug``
    re-raises everything with its traceback.
    """
    if debug:
        raise err
    if isinstance(err, KeyboardInterrupt):
        print(f"arelbo {command}: interrupted", file=sys.stderr)
        return 130
    message = expected_message(err)
    if message is not None:
        print(f"arelbo {command}: error: {message}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    print(f"arelbo {command}: internal error ({type(err).__name__}): this is a bug in arelbo; please report "
          "it with the traceback above", file=sys.stderr)
    return 1


def build_parser(commands=None) -> argparse.ArgumentParser:
    """The parser; only the commands in ``commands`` (default: all) import their module and get their arguments,
    so ``arelbo --help`` and ``arelbo CMD ...`` import nothing else (no torch for the top-level help)."""
    from arelbo import __version__

    parser = argparse.ArgumentParser(prog="arelbo", description="Gaussian VAEs without posterior collapse (AR-ELBO).")
    parser.add_argument("--version", action="version", version=f"arelbo {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of any error (by default expected errors are one line)")
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


# Modules to import before any command runs, comma-separated: where users register their own policies, priors or
# samplers. An environment variable, not a flag, so that the processes a study starts (--jobs N) know them too.
PLUGINS_ENV = "ARELBO_PLUGINS"


def import_plugins() -> list[str]:
    """Import the modules named in ``ARELBO_PLUGINS`` (their ``@register_*`` decorators run on import)."""
    names = [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise CommandError(f"{PLUGINS_ENV}: cannot import {name!r} ({err}); put its folder on PYTHONPATH or "
                               "install it") from err
    return names


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        import_plugins()
    except CommandError as err:
        print(f"arelbo: error: {err}", file=sys.stderr)
        return err.exit_code
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
    except (Exception, KeyboardInterrupt) as err:
        return handle_error(args.command, err, args.debug)


if __name__ == "__main__":
    sys.exit(main())
