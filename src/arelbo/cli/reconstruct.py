"""``arelbo reconstruct``: data from a split above their reconstructions f(mu(x)), as one PNG."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `arelbo train`")
    parser.add_argument("--n", type=int, default=32, help="number of images (default: 32, the first of the split)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"), help="data split (default: test)")
    parser.add_argument("--nrow", type=int, default=8, help="images per row (default: 8)")
    parser.add_argument("--checkpoint", default="best", help="best (default), last, or a file in checkpoints/")
    parser.add_argument("--out", metavar="FILE.png", help="output file (default: RUN_DIR/reconstructions-SPLIT.png)")


def run(args: argparse.Namespace) -> int:
    from arelbo.grids import reconstruction_grid
    from arelbo.imagegrid import check_png_path, save_png

    if args.out:
        check_png_path(args.out)
    grid = reconstruction_grid(args.run_dir, args.n, args.split, args.nrow, args.checkpoint)
    out = Path(args.out) if args.out else Path(args.run_dir) / f"reconstructions-{args.split}.png"
    save_png(grid, out)
    print(f"wrote {out}")
    return 0
