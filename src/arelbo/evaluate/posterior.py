"""Stage 1: one pass over the evaluation split (and the validation split) through the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from arelbo.evaluate.common import generator
from arelbo.evaluate.load import Loaded

__all__ = ["Encoded", "encode"]


@dataclass
class Encoded:
    """Stage 1: one pass over the evaluation split (and the validation split) through the model.

    ``mu``/``logvar``: every latent unit's posterior mean and log-variance, the groups flattened and concatenated
    in order, each group at its posterior given the groups above taken at their posterior means (a flat VAE: its
    one latent vector); ``groups``: each group's name and unit count, in the same order."""

    acc: Any  # ELBOAccumulator over the evaluation split
    val_acc: Any  # ... over the validation split (the same object when evaluating on val)
    mu: Any  # (N, units) posterior means, float32 CPU
    logvar: Any
    groups: dict  # group name -> its number of units (the columns of mu, in order)
    mse_sum: float  # sum over examples of ||x - f(mu)||^2
    mode: str  # how E_q (x - f(z))^2 was computed
    num_elements: int
    latent_dim: int  # every unit of every group
    num_examples: int

    def group_slices(self) -> dict[str, slice]:
        """Each group's columns of ``mu``/``logvar``."""
        out, start = {}, 0
        for name, units in self.groups.items():
            out[name] = slice(start, start + units)
            start += units
        return out


def _pass(model, loader, mode: str, acc, noise, device, progress, means: list | None = None) -> float:
    """Accumulate the -ELBO sums of a split; with ``means``, also collect the posterior means and log-variances
    (every group at its posterior mean given the groups above) and return the posterior-mean reconstruction's
    summed squared error."""
    import torch

    from arelbo.metrics.collapse import batch_sq_err, iterate_batches

    mse_sum = 0.0
    with torch.inference_mode():
        for x in iterate_batches(loader, device, progress=progress):
            output = model(x, sample=mode != "mean", noise=noise)
            acc.update_output(batch_sq_err(model, x, mode, output=None if mode == "exact" else output), output)
            if means is None:
                continue
            at_mean = output if mode == "mean" else model(x, sample=False)
            mse_sum += float((x.flatten(1).double() - at_mean.x_hat.flatten(1).double()).pow(2).sum())
            means.append((torch.cat([g.mu.float().flatten(1) for g in at_mean.groups], 1).cpu(),
                          torch.cat([g.logvar.float().flatten(1) for g in at_mean.groups], 1).cpu(),
                          {g.name: g.num_units for g in at_mean.groups}))
    return mse_sum


def encode(run: Loaded, c, progress) -> Encoded:
    """Squared errors, rates and posteriors of the evaluation split; the validation split's sums."""
    import torch

    from arelbo.data import make_loader
    from arelbo.metrics.likelihood import ELBOAccumulator
    from arelbo.models.outputs import generator_noise

    model, device = run.model, run.device
    mode = c.sq_err
    if mode == "auto":
        mode = "exact" if hasattr(model, "expected_sq_err") else "sample"
    acc = ELBOAccumulator(per_sample_floor=run.loss_fn.policy.floor)
    acc.sq_err_mode = mode
    means: list = []
    # one noise stream: the sampled code gives the squared error and, under a learnable prior, the rate's estimate
    mse_sum = _pass(model, run.loader, mode, acc, generator_noise(generator(c.seed, "elbo")), device,
                    progress and "eval: encoding", means)
    mu_all, logvar_all = torch.cat([m[0] for m in means]), torch.cat([m[1] for m in means])
    groups = means[0][2]
    # the validation split: where every data-estimated sigma2 is fitted
    if c.split == "val":
        val_acc = acc
    else:
        val_acc = ELBOAccumulator(per_sample_floor=run.loss_fn.policy.floor)
        _pass(model, make_loader(run.val_score, c.batch_size, shuffle=False), mode, val_acc,
              generator_noise(generator(c.seed, "elbo-val")), device, progress and "eval: validation pass")
    return Encoded(acc, val_acc, mu_all, logvar_all, groups, mse_sum, mode, acc.num_elements, int(mu_all.shape[1]),
                   int(run.eval_data.shape[0]))
