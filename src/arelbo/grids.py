"""Image grids of a trained run: samples (from the prior or a sampler ``arelbo eval`` fitted) and reconstructions.

Used by ``arelbo sample`` / ``arelbo reconstruct``, the demo and the study reports.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["fitted_sampler", "sample_grid", "reconstruction_grid", "variance_grid"]


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


def variance_grid(run_dir, n: int = 32, split: str = "test", nrow: int = 8, checkpoint: str = "best", splits=None,
                  diagonal_run=None, seed: int = 0):
    """Data, reconstructions f(mu(x)) and their sigma2(z) maps at z = mu(x) (a run whose decoder has a variance
    head), and with ``diagonal_run`` (e.g. an ``ar-diagonal`` run) that run's per-pixel sigma2 as its evaluation
    rule fits it on the validation split. Maps on one log scale (black: the smallest value shown, white: the
    largest; channels averaged in log), so where the model is unsure is visible beside what it reconstructs."""
    import torch

    from arelbo.data import load_dataset, to_float
    from arelbo.imagegrid import make_grid, stack_labelled
    from arelbo.runs import load_model

    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if nrow < 1:
        raise ValueError(f"--nrow must be >= 1 (images per row), got {nrow}")
    model, loss_fn, ckpt = load_model(run_dir, checkpoint)
    if getattr(model, "variance_head", None) is None:
        raise ValueError(f"{run_dir}: its decoder outputs no variance (model.variance_head is off): sigma2(z) maps "
                         f"need a run trained with --set model.variance_head=true (ar-conditional, learned-conditional)")
    if splits is None:
        d = ckpt["config"]["data"]
        splits = load_dataset(d["name"], d["root"], **d["options"])
    x = to_float(splits.split(split)[:n])
    with torch.no_grad():
        out = model(x, sample=False)
    log_maps = [out.x_logvar.double().exp().clamp_min(loss_fn.policy.floor).log10().mean(1, keepdim=True)]
    labels = ["sigma2(z) maps"]
    if diagonal_run is not None:
        log_maps.append(_diagonal_log_map(diagonal_run, checkpoint, seed, x.shape[1:]))
        labels.append(f"per-pixel sigma2 of {Path(diagonal_run).name}")
    lo = min(float(m.min()) for m in log_maps)
    hi = max(float(m.max()) for m in log_maps)
    scaled = [(m - lo) / max(hi - lo, 1e-12) for m in log_maps]
    scale = f"log scale: black {10 ** lo:.3g}, white {10 ** hi:.3g}"
    grids = [make_grid(x, nrow=nrow), make_grid(out.x_hat, nrow=nrow), make_grid(scaled[0], nrow=nrow)]
    names = [f"{split} data", "reconstructions f(mu(x))", f"{labels[0]} ({scale})"]
    if diagonal_run is not None:
        grids.append(make_grid(scaled[1], nrow=1))
        names.append(labels[1])
    return stack_labelled(grids, names, horizontal=False)


def _diagonal_log_map(run_dir, checkpoint: str, seed: int, shape):
    """(1, 1, H, W) log10 of a run's per-element held-out sigma2 (its policy's rule on the validation split,
    one seeded z ~ q(z|x) per example, as ``arelbo eval`` fits it), channels averaged in log."""
    import torch

    from arelbo.data import load_dataset, to_float
    from arelbo.metrics.collapse import batch_sq_err
    from arelbo.metrics.likelihood import ELBOAccumulator
    from arelbo.runs import load_model

    model, loss_fn, ckpt = load_model(run_dir, checkpoint)
    if tuple(ckpt["data_shape"]) != tuple(shape):
        raise ValueError(f"--diagonal {run_dir}: its data have shape {tuple(ckpt['data_shape'])}, not {tuple(shape)}")
    d = ckpt["config"]["data"]
    val = load_dataset(d["name"], d["root"], **d["options"]).split("val")
    acc = ELBOAccumulator(per_sample_floor=loss_fn.policy.floor)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for start in range(0, len(val), 100):
            x = to_float(val[start : start + 100])
            out = model(x, noise=lambda like: torch.randn(like.shape, generator=generator, dtype=like.dtype))
            acc.update_output(batch_sq_err(model, x, "sample", output=out), out)
    held = loss_fn.policy.held_out_sigma2(acc)
    if held.kind != "diagonal":
        raise ValueError(f"--diagonal {run_dir}: its policy {loss_fn.policy.name!r} has no per-pixel sigma2 "
                         f"(its held-out sigma2 is {held.kind}); give an ar-diagonal run")
    return held.value.double().log10().reshape(1, *shape).mean(1, keepdim=True)
