"""``arelbo sample``: a PNG grid of decoder means f(z) from a trained run, z from the prior or a fitted sampler.

``--sampler gmm`` / ``two-stage`` reuse the fit ``arelbo eval`` saved in ``RUN_DIR/samplers/`` (it is tied to the
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
                        help="prior (default), or an ex-post sampler fitted by `arelbo eval` (gmm, two-stage)")
    parser.add_argument("--out", metavar="FILE.png",
                        help="output file (default: RUN_DIR/samples.png; RUN_DIR/samples-SAMPLER.png)")


def fitted_sampler(run_dir, name: str, checkpoint: str = "best"):
    """The sampler ``arelbo eval`` fitted and saved for this run's ``checkpoint``; errors say how to make one."""
    from arelbo.evaluate import sampler_file
    from arelbo.metrics.features import sha256_file
    from arelbo.runs import checkpoint_path
    from arelbo.samplers import SAMPLERS, load_sampler

    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(sorted(SAMPLERS))}")
    ckpt = checkpoint_path(run_dir, checkpoint)
    path = sampler_file(run_dir, name, checkpoint)
    fit_it = f"`arelbo eval {run_dir} --which {checkpoint} --sampler {name}`"
    if not path.is_file():
        raise FileNotFoundError(f"no fitted {name!r} sampler in {path.parent}: fit one with {fit_it}")
    try:
        sampler, extra = load_sampler(path)
    except ValueError as err:
        raise ValueError(f"{err}: fit it again with {fit_it} --refit-samplers") from None
    key = extra.get("key") or {}
    if key.get("checkpoint_sha256") != sha256_file(ckpt):
        raise ValueError(f"{path} was fitted for checkpoint {key.get('checkpoint')!r} with other weights than "
                         f"{ckpt.name}: pass --checkpoint {Path(str(key.get('checkpoint', 'last'))).stem} or refit "
                         f"with {fit_it}")
    return sampler


def sample_grid(run_dir, n: int = 64, seed: int = 0, nrow=None, checkpoint: str = "best", sampler: str = "prior"):
    """The (H, W, C) uint8 grid of ``n`` samples (decoder means) of a run's model."""
    import torch

    from arelbo.imagegrid import make_grid
    from arelbo.runs import load_model
    from arelbo.samplers import decode_samples

    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    model, _, _ = load_model(run_dir, checkpoint)
    generator = torch.Generator().manual_seed(seed)
    if sampler == "prior":
        return make_grid(model.sample(n, generator=generator), nrow=nrow)
    return make_grid(decode_samples(model, fitted_sampler(run_dir, sampler, checkpoint), n, generator), nrow=nrow)


def run(args: argparse.Namespace) -> int:
    from arelbo.imagegrid import save_png

    grid = sample_grid(args.run_dir, args.n, args.seed, args.nrow, args.checkpoint, args.sampler)
    default = "samples.png" if args.sampler == "prior" else f"samples-{args.sampler}.png"
    out = Path(args.out) if args.out else Path(args.run_dir) / default
    save_png(grid, out)
    print(f"wrote {out} ({args.n} samples from the {args.sampler} sampler, {grid.shape[1]}x{grid.shape[0]} px)")
    return 0
