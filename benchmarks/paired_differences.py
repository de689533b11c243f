"""Paired differences between policies from a study's results.json: mean and 95% t-interval over seeds.

    python benchmarks/paired_differences.py docs/results/mnist/results-3seeds.json --reference ar \
        --out docs/results/mnist/paired-3seeds.json

For each policy P other than the reference R and each metric, the per-seed differences R - P (same seed: same data
order, initialisation and noise) give a mean and a Student-t interval (:mod:`arelbo.stats`). Works on the
results.json of any `arelbo compare` run, including those written before the study reported paired differences.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a source tree without install

from arelbo.stats import paired_differences  # noqa: E402

METRICS = ("fid", "fid_gmm", "active_units", "kl_total", "mse", "smoothness")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a study's results.json")
    parser.add_argument("--reference", default="ar", help="the policy slug every other is compared with (default ar)")
    parser.add_argument("--metrics", default=",".join(METRICS), help="comma-separated per-run values to compare")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--out", default=None, help="write the differences as JSON here")
    args = parser.parse_args()

    results = json.loads(Path(args.results).read_text())
    per_seed = {p["slug"]: {c["seed"]: c.get("values", {}) for c in p["cells"]}
                for p in results["policies"] if p.get("sampler", "prior") == "prior"}
    if args.reference not in per_seed:
        parser.error(f"--reference {args.reference!r} not in {sorted(per_seed)}")
    ref = per_seed[args.reference]
    out = {"results": args.results, "reference": args.reference, "confidence": args.confidence,
           "difference": f"{args.reference} - policy, per seed", "pairs": {}}
    for slug, cells in per_seed.items():
        if slug == args.reference:
            continue
        for metric in args.metrics.split(","):
            d = paired_differences({s: v.get(metric) for s, v in ref.items()},
                                   {s: v.get(metric) for s, v in cells.items()}, confidence=args.confidence)
            out["pairs"].setdefault(slug, {})[metric] = d
            lo, hi = d.get("lo"), d.get("hi")
            span = f"[{lo:.4g}, {hi:.4g}]" if lo is not None else "(one seed)"
            print(f"{args.reference} - {slug:16s} {metric:13s} mean {d.get('mean'):10.4g}  {span}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
