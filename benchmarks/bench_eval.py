"""Evaluation-speed benchmark: a default MNIST evaluation (10k samples, FID + diagnostics) on this machine.

    python benchmarks/bench_eval.py [--run RUN_DIR] [--repeats 3] [--out docs/bench_eval.json]

Without --run it first trains a short mnist-conv run (the speed of evaluation does not depend on how well the
model is trained). Each repeat is a full `evaluate_run` with the defaults of `arelbo eval` (prior and GMM
samplers, 10,000 generated images against the 10,000 test images, IS-NLL with K=100 on 1,000 examples); the
samplers are refitted every repeat and the FID reference statistics are recomputed (in-memory cache cleared) so
no repeat is cheaper than a first evaluation. Reports the median and the per-stage breakdown of the median run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch


def _train_short_run(out_dir: str, steps: int) -> str:
    from arelbo.config import load_config
    from arelbo.train import fit

    cfg = load_config(
        preset="mnist-conv",
        overrides=["train.epochs=1", f"train.limit_train_batches={steps}", "train.n_samples=0"],
    )
    return str(fit(cfg, run_dir=os.path.join(out_dir, "run"), progress=False))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="an existing MNIST run directory (default: train a short one)")
    parser.add_argument("--train-steps", type=int, default=200, help="steps of the short run trained without --run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    from arelbo.evaluate import evaluate_run
    from arelbo.metrics import fid as fid_module

    tmp = tempfile.mkdtemp(prefix="arelbo-bench-eval-")
    run_dir = args.run or _train_short_run(tmp, args.train_steps)
    os.environ["ARELBO_CACHE_DIR"] = os.path.join(tmp, "cache")  # no on-disk FID reference cache from earlier runs

    totals, results = [], []
    for _ in range(args.repeats):
        fid_module.clear_reference_cache()  # each repeat pays the full price of a first evaluation
        t0 = time.perf_counter()
        result = evaluate_run(run_dir, refit_samplers=True, write=False, progress=False)
        totals.append(time.perf_counter() - t0)
        results.append(result)
    median_index = sorted(range(len(totals)), key=totals.__getitem__)[len(totals) // 2]
    report = {
        "run_dir": run_dir,
        "repeats": args.repeats,
        "total_s_median": statistics.median(totals),
        "total_s_all": [round(t, 2) for t in totals],
        "stages_s_of_median_run": results[median_index]["timings_s"],
        "fid": {k: v for k, v in results[median_index]["summary"].items() if k.startswith("fid")},
        "n_samples": results[median_index]["protocol"]["fid"].get("n_samples"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
