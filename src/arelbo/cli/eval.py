"""``arelbo eval RUN_DIR``: evaluate a trained run (:func:`arelbo.evaluate.evaluate_run`) and print the table.

Its options are the fields of :class:`arelbo.evalconfig.EvalConfig`, one flag each.
"""

from __future__ import annotations

import json
import sys


def add_arguments(parser) -> None:
    from arelbo.evalconfig import add_arguments as add_eval_arguments

    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (config.yaml, checkpoints/)")
    add_eval_arguments(parser)  # one option per EvalConfig field
    parser.add_argument("--no-write", action="store_true", help="do not write metrics.json or sampler files")
    parser.add_argument("--no-progress", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print the metrics JSON instead of the table")


def run(args) -> int:
    from arelbo.evalconfig import EvalConfig
    from arelbo.evaluate import evaluate_run, format_table, metrics_file

    result = evaluate_run(args.run_dir, EvalConfig.from_args(args), write=not args.no_write,
                          progress=not args.no_progress and sys.stderr.isatty())
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
        if not args.no_write:
            print(f"\nwrote {metrics_file(args.run_dir, args.which)}")
    return 0
