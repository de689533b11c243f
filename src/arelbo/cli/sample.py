"""``arelbo sample``: a PNG grid of decoder means f(z) from a trained run, z from the model's own prior (N(0, I) or
the learnable prior it was trained with) or a fitted sampler.

``--sampler gmm`` / ``flow`` / ``two-stage`` reuse the fit ``arelbo eval`` saved in ``RUN_DIR/samplers/`` (it is tied to the
checkpoint's sha256, so a fit for another checkpoint is refused rather than silently used).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `arelbo train`")
    parser.add_argument("--n", type=int, default=64, help="number of samples (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latent draws (default: 0)")
    parser.add_argument("--nrow", type=int, default=None, help="images per row (default: about square)")
    parser.add_argument("--checkpoint", default="best", help="best (default), last, or a file in checkpoints/")
    parser.add_argument("--sampler", default="prior",
                        help="prior (default: the model's own prior), or an ex-post sampler fitted by `arelbo eval` "
                             "(gmm, flow, two-stage)")
    parser.add_argument("--out", metavar="FILE.png",
                        help="output file (default: RUN_DIR/samples.png; RUN_DIR/samples-SAMPLER.png)")


def run(args: argparse.Namespace) -> int:
    from arelbo.grids import sample_grid
    from arelbo.imagegrid import check_png_path, save_png

    if args.out:
        check_png_path(args.out)
    grid = sample_grid(args.run_dir, args.n, args.seed, args.nrow, args.checkpoint, args.sampler)
    default = "samples.png" if args.sampler == "prior" else f"samples-{args.sampler}.png"
    out = Path(args.out) if args.out else Path(args.run_dir) / default
    save_png(grid, out)
    print(f"wrote {out} ({args.n} samples from the {args.sampler} sampler, {grid.shape[1]}x{grid.shape[0]} px)")
    return 0
