"""``arelbo train``: train a VAE from a preset, a YAML file and ``--set`` overrides, or resume a run."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", metavar="NAME", help="a named configuration shipped with arelbo "
                        "(mnist-conv, mnist-mlp, celeba64-conv, linear-gaussian; --list-presets)")
    parser.add_argument("--config", metavar="FILE", help="a YAML file with any of the sections data, model, "
                        "objective, train (applied over the preset)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override one setting, e.g. --set train.epochs=5 --set objective.policy=fixed "
                        "(repeatable; the value is read as YAML)")
    parser.add_argument("--out", metavar="DIR", help="the run directory: new or empty, or a run arelbo started "
                        "there that stopped before its first checkpoint (started again; a folder of other files, a "
                        "config.yaml of your own included, is refused) (default: <out_dir>/<name>, i.e. "
                        "runs/<preset>-<policy>-<time>)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run exactly from its checkpoints/last.pt "
                        "(only train.* may be changed with --set, e.g. train.epochs or train.lr; seed, optimizer "
                        "and precision may not)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or Lightning banners")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--list-presets", action="store_true", help="list the presets and exit")


def run(args: argparse.Namespace) -> int:
    from arelbo.config import ConfigError, list_presets, load_config

    if args.list_presets:
        for name in list_presets():
            print(name)
        return 0
    if args.resume:
        if args.preset or args.config or args.out:
            raise ConfigError("--resume continues a run with its own config: drop --preset, --config and --out")
        if args.print_config:
            from arelbo.runs import read_config

            print(read_config(args.resume).to_yaml(), end="")
            return 0
        from arelbo.train import NonFiniteLossError, TrainingInterrupted, resume

        try:
            run_dir = resume(args.resume, args.overrides, progress=not args.quiet)
        except (NonFiniteLossError, TrainingInterrupted) as err:
            print(f"arelbo train: {err}", file=sys.stderr)
            return 130 if isinstance(err, TrainingInterrupted) else 1
        _report(run_dir)
        return 0

    cfg = load_config(args.preset, args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from arelbo.train import NonFiniteLossError, TrainingInterrupted, fit

    try:
        run_dir = fit(cfg, args.out, progress=not args.quiet, prefix=args.preset)
    except (NonFiniteLossError, TrainingInterrupted) as err:
        print(f"arelbo train: {err}", file=sys.stderr)
        return 130 if isinstance(err, TrainingInterrupted) else 1
    except FileExistsError as err:
        raise ConfigError(str(err)) from None
    _report(run_dir)
    return 0


def _report(run_dir) -> None:
    import os

    if os.environ.get("LOCAL_RANK", "0") == "0":  # not in the extra processes of a "ddp" launch
        print(f"run directory: {run_dir}")
