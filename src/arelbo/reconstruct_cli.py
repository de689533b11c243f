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


def reconstruction_grid(run_dir, n: int = 32, split: str = "test", nrow: int = 8, checkpoint: str = "best", splits=None):
    """Originals (top block) and reconstructions from the posterior mean (bottom block), labelled."""
    import torch

    from arelbo.data import load_dataset, to_float
    from arelbo.imagegrid import make_grid, stack_labelled
    from arelbo.runs import load_model

    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    model, _, ckpt = load_model(run_dir, checkpoint)
    if splits is None:
        d = ckpt["config"]["data"]
        splits = load_dataset(d["name"], d["root"], **d["options"])
    x = to_float(splits.split(split)[:n])
    with torch.no_grad():
        x_hat = model(x, sample=False).x_hat
    grids = [make_grid(x, nrow=nrow), make_grid(x_hat, nrow=nrow)]
    return stack_labelled(grids, [f"{split} data", "reconstructions f(mu(x))"], horizontal=False)


def run(args: argparse.Namespace) -> int:
    from arelbo.imagegrid import save_png

    grid = reconstruction_grid(args.run_dir, args.n, args.split, args.nrow, args.checkpoint)
    out = Path(args.out) if args.out else Path(args.run_dir) / f"reconstructions-{args.split}.png"
    save_png(grid, out)
    print(f"wrote {out}")
    return 0
