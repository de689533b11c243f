"""``arelbo demo``: AR-ELBO against sigma^2 = 1 on MNIST in a few CPU minutes (:mod:`arelbo.demo`)."""

from __future__ import annotations

import argparse

from arelbo.demo import DEMO_BATCH, DEMO_EPOCHS, DEMO_LR, DEMO_STEPS_PER_EPOCH


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="DIR", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--epochs", type=int, default=DEMO_EPOCHS,
                        help=f"demo epochs of {DEMO_STEPS_PER_EPOCH} steps each (default: {DEMO_EPOCHS})")
    parser.add_argument("--steps-per-epoch", type=int, default=DEMO_STEPS_PER_EPOCH,
                        help=f"training steps per epoch, validation after each (default: {DEMO_STEPS_PER_EPOCH}; "
                        "0: full epochs)")
    parser.add_argument("--batch-size", type=int, default=DEMO_BATCH, help=f"batch size (default: {DEMO_BATCH})")
    parser.add_argument("--lr", type=float, default=DEMO_LR, help=f"Adam learning rate (default: {DEMO_LR:g})")
    parser.add_argument("--seed", type=int, default=0, help="seed of both runs (default: 0)")
    parser.add_argument("--data-root", default=None, help="MNIST IDX files (default: the bundled offline copy)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="extra config overrides applied to both runs (e.g. train.devices=2)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out (only one the demo wrote: its own files)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from arelbo.config import ConfigError

    if args.epochs < 1 or args.steps_per_epoch < 0 or args.batch_size < 1 or not args.lr > 0:
        raise ConfigError("--epochs and --batch-size must be >= 1, --steps-per-epoch >= 0, --lr > 0")
    command = "arelbo " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["demo"] else "arelbo demo"
    try:
        from arelbo.demo import run_demo

        run_demo(args.out, args.epochs, args.steps_per_epoch, args.batch_size, args.seed, args.data_root,
                 args.overrides, args.overwrite, progress=not args.quiet, command=command, lr=args.lr)
    except FileExistsError as err:
        raise ConfigError(str(err)) from None
    return 0
