"""``arelbo sample``: a PNG grid of decoder means f(z), z ~ N(0, I), from a trained run."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `arelbo train`")
    parser.add_argument("--n", type=int, default=64, help="number of samples (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latent draws (default: 0)")
    parser.add_argument("--nrow", type=int, default=None, help="images per row (default: about square)")
    parser.add_argument("--checkpoint", default="best", help="best (default), last, or a file in checkpoints/")
    parser.add_argument("--out", metavar="FILE.png", help="output file (default: RUN_DIR/samples.png)")


def sample_grid(run_dir, n: int = 64, seed: int = 0, nrow=None, checkpoint: str = "best"):
    """The (H, W, C) uint8 grid of ``n`` prior samples of a run's model."""
    import torch

    from arelbo.imagegrid import make_grid
    from arelbo.runs import load_model

    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    model, _, _ = load_model(run_dir, checkpoint)
    generator = torch.Generator().manual_seed(seed)
    return make_grid(model.sample(n, generator=generator), nrow=nrow)


def run(args: argparse.Namespace) -> int:
    from arelbo.imagegrid import save_png

    grid = sample_grid(args.run_dir, args.n, args.seed, args.nrow, args.checkpoint)
    out = Path(args.out) if args.out else Path(args.run_dir) / "samples.png"
    save_png(grid, out)
    print(f"wrote {out} ({args.n} samples, {grid.shape[1]}x{grid.shape[0]} px)")
    return 0
