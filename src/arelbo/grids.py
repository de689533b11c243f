"""Image grids of a trained run: samples (from the prior or a sampler ``arelbo eval`` fitted) and reconstructions.

Used by ``arelbo sample`` / ``arelbo reconstruct``, the demo and the study reports.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["fitted_sampler", "sample_grid", "reconstruction_grid"]


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
    fit_it = f"`arelbo eval {run_dir} --checkpoint {checkpoint} --sampler {name}`"
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
    if nrow is not None and nrow < 1:
        raise ValueError(f"--nrow must be >= 1 (images per row), got {nrow}")
    model, _, _ = load_model(run_dir, checkpoint)
    generator = torch.Generator().manual_seed(seed)
    if sampler == "prior":
        return make_grid(model.sample(n, generator=generator), nrow=nrow)
    return make_grid(decode_samples(model, fitted_sampler(run_dir, sampler, checkpoint), n, generator), nrow=nrow)


def reconstruction_grid(run_dir, n: int = 32, split: str = "test", nrow: int = 8, checkpoint: str = "best", splits=None):
    """Originals (top block) and reconstructions from the posterior mean (bottom block), labelled."""
    import torch

    from arelbo.data import load_dataset, to_float
    from arelbo.imagegrid import make_grid, stack_labelled
    from arelbo.runs import load_model

    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if nrow < 1:
        raise ValueError(f"--nrow must be >= 1 (images per row), got {nrow}")
    model, _, ckpt = load_model(run_dir, checkpoint)
    if splits is None:
        d = ckpt["config"]["data"]
        splits = load_dataset(d["name"], d["root"], **d["options"])
    x = to_float(splits.split(split)[:n])
    with torch.no_grad():
        x_hat = model(x, sample=False).x_hat
    grids = [make_grid(x, nrow=nrow), make_grid(x_hat, nrow=nrow)]
    return stack_labelled(grids, [f"{split} data", "reconstructions f(mu(x))"], horizontal=False)
