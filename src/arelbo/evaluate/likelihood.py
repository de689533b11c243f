"""Stage 3: -ELBO under the run's policy and the common rule, the IS-NLL, the exact NLL of a linear model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from arelbo.evaluate.common import generator
from arelbo.evaluate.load import Loaded
from arelbo.evaluate.posterior import Encoded

__all__ = ["Likelihood", "likelihood"]


@dataclass
class Likelihood:
    """Stage 3: -ELBO under the run's policy and the common rule, IS-NLL, the exact NLL of a linear model."""

    elbo_policy: Any  # ELBOResult
    elbo_ar: Any
    sigma2_diag: Any
    density_sigma2: Any  # the sigma2 the IS-NLL (and exact NLL) use: a tensor, or OwnVariance (the model's sigma2(z))
    is_density: bool
    density_note: str | None
    is_note: str | None
    is_res: Any  # ISResult or None
    n_is: int
    exact: dict | None



def likelihood(run: Loaded, enc: Encoded, c, progress) -> Likelihood:
    import torch

    from arelbo.data import make_loader
    from arelbo.metrics.collapse import iterate_batches
    from arelbo.metrics.likelihood import OwnVariance, importance_sampled_nll_dataset, linear_vae_exact_nll

    model, loss_fn, device = run.model, run.loss_fn, run.device
    acc, val_acc, d, n_eval = enc.acc, enc.val_acc, enc.num_elements, enc.num_examples
    policy = loss_fn.policy
    policy_name = policy.name
    floor = policy.floor
    fitted_on = "the evaluation split itself" if c.split == "val" else "the validation split"
    held = policy.held_out_sigma2(val_acc)  # a data-estimated rule is fitted on the validation split
    common = val_acc.ar_sigma2().clamp_min(floor)
    if held.value is None:  # per example (its own MLE) or the model's own sigma2(z): from the scored split's sums
        elbo_policy = acc.result(loss_fn)
    else:
        source = (held.source if policy.sigma2_kind != "estimated"
                  else f"{held.source.replace('eval-set ', '')}, fitted on {fitted_on}")
        elbo_policy = acc.result(held.value, source=source)
    elbo_ar = acc.result(common, source=f"common rule for every policy: isotropic MLE fitted on {fitted_on}")
    sigma2_diag = acc.ar_sigma2(diagonal=True)
    density = policy.density_sigma2(val_acc)
    value = OwnVariance(floor) if density.kind == "conditional" else density.value
    is_density, is_note, density_note = policy.is_density, None, None
    if not is_density:
        density_note = (f"policy {policy_name}'s sigma2 defines no single density: this -ELBO is not a likelihood "
                        f"bound; compare the common-rule -ELBO (neg_elbo_ar)")
        is_note = f"policy {policy_name}'s sigma2 defines no single density: IS-NLL uses the validation isotropic MLE"
    n_is = n_eval if c.is_examples is None else min(n_eval, int(c.is_examples))
    is_res = None
    if n_is > 0:
        is_loader = make_loader(run.score_data[:n_is], max(1, min(c.batch_size, 100)), shuffle=False)
        is_res = importance_sampled_nll_dataset(model, is_loader, value if density.value is None else value.to(device), c.k, generator(c.seed, "is-nll"),
                                                progress=progress and f"eval: IS-NLL (K={c.k})")
    exact = None
    # -log N(x; b, W W^T + sigma2) is the marginal of a linear decoder under the N(0, I) prior only: a learnable
    # prior (no closed-form KL) has another marginal, so no "exact" value is reported for it
    standard_prior = getattr(getattr(model, "prior", None), "closed_form_kl", True)
    if standard_prior and hasattr(model, "expected_sq_err") and hasattr(getattr(model, "decoder", None), "linear"):
        with torch.inference_mode():
            vals = torch.cat([linear_vae_exact_nll(model, x, value.to(x.device)).cpu()
                              for x in iterate_batches(run.loader, device)])
        exact = {"nll": float(vals.mean()), "bits_per_dim": float(vals.mean()) / (d * math.log(2)),
                 "nll_is_subset": float(vals[:n_is].mean()) if n_is else None,
                 "note": "closed-form -log N(x; b, W W^T + sigma2) at the sigma2 the IS-NLL uses"}
    return Likelihood(elbo_policy, elbo_ar, sigma2_diag, value, is_density, density_note, is_note, is_res, n_is, exact)


