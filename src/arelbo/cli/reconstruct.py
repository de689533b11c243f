"""``arelbo reconstruct``: data from a split above their reconstructions f(mu(x)), as one PNG; ``--variance``: and
their sigma2(z) maps (a decoder with a variance head), ``--diagonal RUN``: beside an ar-diagonal run's map."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_N = 32  # images shown by default (fewer when the split is smaller)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `arelbo train`")
    parser.add_argument("--n", type=int, default=None, help="number of images, the first of the split (default: 32, "
                        "or all of a smaller split; more than the split holds is refused)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"), help="data split (default: test)")
    parser.add_argument("--nrow", type=int, default=8, help="images per row (default: 8)")
    parser.add_argument("--checkpoint", default="best", help="best (default), last, or a file in checkpoints/")
    parser.add_argument("--out", metavar="FILE.png", help="output file (default: RUN_DIR/reconstructions-SPLIT.png, "
                        "with --variance RUN_DIR/variance-SPLIT.png)")
    parser.add_argument("--variance", action="store_true", help="add the sigma2(z) maps of a run whose decoder "
                        "outputs its variance (model.variance_head: ar-conditional, learned-conditional), log scale")
    parser.add_argument("--diagonal", metavar="RUN", help="with --variance: add this run's per-pixel sigma2 (an "
                        "ar-diagonal run on the same data), on the same scale")


def run(args: argparse.Namespace) -> int:
    from arelbo.grids import reconstruction_grid
    from arelbo.imagegrid import check_png_path, save_png

    if args.out:
        check_png_path(args.out)
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.nrow < 1:
        raise ValueError(f"--nrow must be >= 1 (images per row), got {args.nrow}")
    if args.diagonal and not args.variance:
        raise ValueError("--diagonal RUN adds a map to the sigma2(z) figure: give --variance too")
    splits, n = _splits_with(args.run_dir, args.checkpoint, args.split, args.n)
    if args.variance:
        from arelbo.grids import variance_grid

        grid = variance_grid(args.run_dir, n, args.split, args.nrow, args.checkpoint, splits=splits,
                             diagonal_run=args.diagonal)
    else:
        grid = reconstruction_grid(args.run_dir, n, args.split, args.nrow, args.checkpoint, splits=splits)
    stem = "variance" if args.variance else "reconstructions"
    out = Path(args.out) if args.out else Path(args.run_dir) / f"{stem}-{args.split}.png"
    save_png(grid, out)
    print(f"wrote {out}")
    return 0


def _splits_with(run_dir, checkpoint: str, split: str, n: int | None):
    """The run's data (as its checkpoint's config names them) and the number of images to show: ``n`` when
    ``split`` holds that many (more is refused, not quietly cut to the split's size), else by default
    DEFAULT_N or the whole of a smaller split."""
    from arelbo.data import load_dataset
    from arelbo.runs import checkpoint_path, load_checkpoint

    d = load_checkpoint(checkpoint_path(run_dir, checkpoint))["config"]["data"]
    splits = load_dataset(d["name"], d["root"], **d["options"])
    size = len(splits.split(split))
    if n is None:
        return splits, min(DEFAULT_N, size)
    if n > size:
        raise ValueError(f"--n {n}: the {split} split has {size} images; ask for at most --n {size}")
    return splits, n
