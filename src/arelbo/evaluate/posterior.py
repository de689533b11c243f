"""Stage 1: one pass over the evaluation split (and the validation split) through the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from arelbo.evaluate.common import generator
from arelbo.evaluate.load import Loaded

__all__ = ["Encoded", "encode"]


@dataclass
class Encoded:
    """Stage 1: one pass over the evaluation split (and the validation split) through the encoder."""

    acc: Any  # ELBOAccumulator over the evaluation split
    val_acc: Any  # ... over the validation split (the same object when evaluating on val)
    mu: Any  # (N, q) posterior means, float32 CPU
    logvar: Any
    mse_sum: float  # sum over examples of ||x - f(mu)||^2
    mode: str  # how E_q (x - f(z))^2 was computed
    num_elements: int
    latent_dim: int
    num_examples: int



def encode(run: Loaded, c, progress) -> Encoded:
    """Posteriors, squared errors, posterior-mean reconstruction error; the validation split's sums."""
    import torch

    from arelbo.data import make_loader
    from arelbo.metrics.collapse import batch_sq_err, iterate_batches
    from arelbo.metrics.likelihood import ELBOAccumulator, monte_carlo_rate

    model, device = run.model, run.device
    mode = c.sq_err
    if mode == "auto":
        mode = "exact" if hasattr(model, "expected_sq_err") else "sample"
    acc = ELBOAccumulator(per_sample_floor=run.loss_fn.policy.floor)
    acc.sq_err_mode = mode
    gen_elbo, gen_rate = generator(c.seed, "elbo"), generator(c.seed, "rate")
    mus, logvars = [], []
    mse_sum = 0.0
    with torch.inference_mode():
        for x in iterate_batches(run.loader, device, progress=progress and "eval: encoding"):
            mu, logvar = model.encode(x)
            acc.update(batch_sq_err(model, x, mode, gen_elbo, (mu, logvar)), mu, logvar,
                       monte_carlo_rate(model, mu, logvar, gen_rate))  # None: closed-form KL (standard prior)
            mse_sum += float((x.flatten(1).double() - model.decode(mu).flatten(1).double()).pow(2).sum())
            mus.append(mu.float().cpu())
            logvars.append(logvar.float().cpu())
    mu_all, logvar_all = torch.cat(mus), torch.cat(logvars)
    # the validation split: where every data-estimated sigma2 is fitted
    if c.split == "val":
        val_acc = acc
    else:
        val_acc = ELBOAccumulator(per_sample_floor=run.loss_fn.policy.floor)
        gen_val, gen_val_rate = generator(c.seed, "elbo-val"), generator(c.seed, "rate-val")
        with torch.inference_mode():
            for x in iterate_batches(make_loader(run.val_score, c.batch_size, shuffle=False), device,
                                     progress=progress and "eval: validation pass"):
                mu, logvar = model.encode(x)
                val_acc.update(batch_sq_err(model, x, mode, gen_val, (mu, logvar)), mu, logvar,
                               monte_carlo_rate(model, mu, logvar, gen_val_rate))
    return Encoded(acc, val_acc, mu_all, logvar_all, mse_sum, mode, acc.num_elements, int(mu_all.shape[1]),
                   int(run.eval_data.shape[0]))


