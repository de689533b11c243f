"""The metrics.json dict of the stages' results, and its table for the terminal."""

from __future__ import annotations

import math
import platform
from datetime import datetime, timezone
from typing import Any

from arelbo.evaluate.collapse import Collapse
from arelbo.evaluate.common import METRICS_FORMAT, clean
from arelbo.evaluate.likelihood import Likelihood
from arelbo.evaluate.load import Loaded
from arelbo.evaluate.posterior import Encoded
from arelbo.evaluate.samples import Samples

__all__ = ["metrics_dict", "format_table", "learnable_prior", "group_diagnostics"]


def learnable_prior(name: str | None) -> bool:
    """Whether a run's prior (by its recorded name) is other than N(0, I): the prior class says (closed_form_kl)."""
    from arelbo.models.priors import PRIORS

    return name is not None and name in PRIORS and not PRIORS[name].closed_form_kl



def group_diagnostics(enc: Encoded, au, kl_per_group: dict, smooth) -> list[dict]:
    """Per latent group: its units, active units, KL (nats per example), mean smoothness, and whether it collapsed
    (no active unit: every unit's Var_x(mu_j) at most the active-unit threshold)."""
    out = []
    for name, cols in enc.group_slices().items():
        active = int(au.mask[cols].sum())
        out.append({"name": name, "units": cols.stop - cols.start, "active_units": active,
                    "kl": kl_per_group.get(name),
                    "smoothness_mean": None if smooth is None else float(smooth[cols].nanmean()),
                    "collapsed": active == 0})
    return out


def _is_sigma2(value, elbo_policy) -> dict:
    """The IS-NLL's sigma2: a value's kind and mean, or the model's own sigma2(z) (its mean over the -ELBO pass)."""
    if not hasattr(value, "dim"):  # OwnVariance: the decoder's sigma2(z) at each draw
        return {"sigma2_kind": "conditional", "sigma2_mean": elbo_policy.sigma2_mean}
    return {"sigma2_kind": "isotropic" if value.dim() == 0 else "diagonal", "sigma2_mean": float(value.mean())}


def metrics_dict(run: Loaded, enc: Encoded, col: Collapse, lik: Likelihood, smp: Samples, c,
             timings: dict) -> dict[str, Any]:
    """The metrics.json dict of the stages' results."""
    import torch

    from arelbo import __version__

    q, d, n_eval, mode = enc.latent_dim, enc.num_elements, enc.num_examples, enc.mode
    acc, val_acc, mse_sum = enc.acc, enc.val_acc, enc.mse_sum
    au, mi, n_mi, mi_dims = col.au, col.mi, col.n_mi, col.mi_dims
    smooth, smooth_norm, n_smooth = col.smooth, col.smooth_norm, col.n_smooth
    elbo_policy, elbo_ar, sigma2_diag, value = lik.elbo_policy, lik.elbo_ar, lik.sigma2_diag, lik.density_sigma2
    is_density, density_note, is_note, is_res, n_is, exact = (lik.is_density, lik.density_note, lik.is_note,
                                                              lik.is_res, lik.n_is, lik.exact)
    sampler_results, fid_results, net = smp.samplers, smp.fid, smp.feature_net
    reference_name, use_kid, fid_unavailable = smp.reference, smp.kid, smp.unavailable
    run_dir, ckpt_file, ckpt, splits, cfg, device = run.run_dir, run.ckpt_file, run.ckpt, run.splits, run.cfg, run.device
    which, split, max_examples, batch_size, seed = c.which, c.split, c.max_examples, c.batch_size, c.seed
    threshold, k, n_samples, dequantize = c.threshold, c.k, c.n_samples, c.dequantize
    fid_repeats, fid_reconstruction, fid_recon = c.fid_repeats, c.fid_reconstruction, smp.reconstruction
    policy_name = run.loss_fn.policy.name
    collapse = {
        "latent_dim": q,
        "active_units": au.count,
        "active_mask": au.mask.tolist(),
        "latent_variance": au.variance.tolist(),
        "kl_per_dim": elbo_policy.kl_per_dim,
        "kl_total": elbo_policy.rate,
        "mutual_information": mi,
        "mutual_information_max": math.log(n_mi) if n_mi else None,
        "mutual_information_per_dim": mi_dims.tolist(),
        "mutual_information_per_dim_total": float(mi_dims.sum()),
        "smoothness_per_dim": smooth.tolist() if smooth is not None else None,
        "smoothness_mean": float(smooth.nanmean()) if smooth is not None else None,
        "smoothness_normalised_per_dim": smooth_norm.tolist() if smooth_norm is not None else None,
        "smoothness_normalised_mean": float(smooth_norm.nanmean()) if smooth_norm is not None else None,
    }
    collapse["groups"] = group_diagnostics(enc, au, elbo_policy.rate_per_group or {}, smooth)
    collapse["collapsed_groups"] = sum(g["collapsed"] for g in collapse["groups"])
    likelihood = {
        "policy": policy_name,
        "sigma2_ar": float(acc.ar_sigma2()),
        "sigma2_ar_diagonal": {"mean": float(sigma2_diag.mean()), "min": float(sigma2_diag.min()),
                               "max": float(sigma2_diag.max()),
                               "geometric_mean": float(sigma2_diag.clamp_min(1e-30).log().mean().exp())},
        "sigma2_val": float(val_acc.ar_sigma2()),
        "neg_elbo": {**elbo_policy.to_dict(), "is_density": is_density, "note": density_note},
        "neg_elbo_ar": elbo_ar.to_dict(),
        "is_nll": None if is_res is None else {**is_res.to_dict(), **_is_sigma2(value, elbo_policy), "note": is_note},
        "exact_nll": exact,
        "mse": mse_sum / (n_eval * d),
        "distortion": elbo_policy.distortion,
    }
    for key_ in ("neg_elbo", "neg_elbo_ar"):
        if isinstance(likelihood[key_]["sigma2"], list):  # a (D,) vector: keep the summary, not D numbers
            likelihood[key_]["sigma2"] = "diagonal (see sigma2_mean and sigma2_ar_diagonal)"
        likelihood[key_].pop("kl_per_dim")  # already under collapse
    summary = {
        "active_units": au.count,
        "latent_dim": q,
        "kl_total": elbo_policy.rate,
        "mutual_information": mi,
        "smoothness_mean": collapse["smoothness_mean"],
        "smoothness_normalised_mean": collapse["smoothness_normalised_mean"],
        "mi_per_dim_total": collapse["mutual_information_per_dim_total"],
        "sigma2_ar": likelihood["sigma2_ar"],
        "neg_elbo": elbo_policy.neg_elbo,
        "neg_elbo_bpd": elbo_policy.bits_per_dim,
        "neg_elbo_ar": elbo_ar.neg_elbo,
        "neg_elbo_ar_bpd": elbo_ar.bits_per_dim,
        "is_nll": None if is_res is None else is_res.nll,
        "is_nll_bpd": None if is_res is None else is_res.bits_per_dim,
        "neg_elbo_is_density": is_density,
        "mse": likelihood["mse"],
    }
    if dequantize:  # -log2 P(v) / D <= (E_u[-log p(x~)] + D log 255) / (D ln 2)
        for key in ("neg_elbo", "neg_elbo_ar", "is_nll"):
            nats = summary[key]
            summary[f"{key}_bpd_discrete"] = None if nats is None else (nats + d * math.log(255.0)) / (d * math.log(2.0))
    for name, res in fid_results.items():
        summary[f"fid_{name}"] = res.get("fid")
        if res.get("sample_draws"):
            summary[f"fid_{name}_draws_std"] = res["sample_draws"]["std"]
    summary["fid_reconstruction"] = None if fid_recon is None else fid_recon.get("fid")
    result = {
        "format": METRICS_FORMAT,
        "arelbo_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run_dir),
        "checkpoint": {"which": which, "file": ckpt_file.name, "step": clean(ckpt.get("global_step")),
                       "epoch": clean(ckpt.get("epoch")), "global_step": clean(ckpt.get("global_step"))},
        "run": {"dataset": splits.name, "data_shape": list(splits.shape), "arch": cfg.get("model", {}).get("arch"),
                "latent_dim": q, "policy": policy_name, "prior": run.model.prior.name},
        "protocol": {
            "split": split,
            "num_examples": n_eval,
            "num_elements": d,
            "max_examples": max_examples,
            "batch_size": batch_size,
            "seed": seed,
            "device": str(device),
            "sq_err": {"exact": "E_q (x - f(z))^2 in closed form (linear model)",
                       "sample": "one reparameterised z ~ q(z|x) per example",
                       "mean": "z = mu (posterior mean)"}[mode],
            "sigma2": elbo_policy.sigma2_source,
            "sigma2_fitted_on": "val" if split != "val" else "val (the evaluation split)",
            "dequantize": {"on": bool(dequantize),
                           "convention": "pixels stored as v/255, v in {0..255}; scored x~ = (v + u - 1/2)/255, "
                                         "u ~ U[0,1)^D; bits/dim (discrete) = (nats + D ln 255) / (D ln 2), an "
                                         "upper bound on -log2 P(v) / D" if dequantize else None},
            "rate": ("closed-form KL(q(z|x) || N(0, I)), per latent dimension" if run.model.prior.closed_form_kl else
                     f"one-sample Monte-Carlo KL(q(z|x) || p(z)) under the learned {run.model.prior.name!r} prior "
                     "(q's entropy in closed form); no KL per dimension"),
            "active_threshold": threshold,
            "active_variance": "Var_x(mu_j) over the evaluation examples, divided by N; with several latent groups, "
                               "each at its posterior mean given the groups above at theirs",
            "collapsed_group": "a latent group with no active unit",
            "mi": {"num_examples": n_mi, "samples_per_example": 1,
                   "estimator": "E[log q(z|x) - log q(z)], q(z) = mixture of the N posteriors; <= log N"},
            "smoothness": {"num_examples": n_smooth, "how": "mean over examples of ||J_f(mu) e_j||_2, forward-mode jvp",
                           "units": ("every unit" if getattr(run.model, "smoothness_units", None) is None else
                                     f"up to {run.model.smoothness_units_per_group} units per group, evenly spaced "
                                     "(the others null)"),
                           "normalised": "times std(mu_j) over the same examples (invariant to rescaling z_j)"},
            "mi_per_dim": {"num_examples": n_eval, "estimator": "1/2 log(Var(mu_j) + E s_j^2) - 1/2 E log s_j^2: "
                           "exact for a Gaussian aggregate posterior of z_j, else an upper bound; not capped at log N"},
            "is_nll": {"k": k, "num_examples": n_is, "sigma2_mean": _is_sigma2(value, elbo_policy)["sigma2_mean"]},
            "samplers": sampler_results,
            "sampler_code": (f"the latent vector ({q} units)" if len(enc.groups) == 1 else
                             f"the top group {next(iter(enc.groups))} ({run.model.code_dim} units); every group below "
                             "drawn from its prior p(z_l | z_<l), its standard deviation scaled by the sampler's "
                             "temperature (1 but for the prior sampler's option)"),
            "fid": {"feature_net": net, "reference": reference_name, "kid": use_kid,
                    "n_samples": n_samples, "skipped": fid_unavailable, "repeats": int(fid_repeats),
                    "reconstruction": bool(fid_reconstruction)},
            "environment": {"torch": torch.__version__, "python": platform.python_version(),
                            "threads": torch.get_num_threads()},
        },
        "summary": summary,
        "collapse": collapse,
        "likelihood": likelihood,
        "fid": fid_results,
        "fid_reconstruction": fid_recon,
        "timings_s": {k_: round(v, 3) for k_, v in timings.items()},
    }
    return result


# --------------------------------------------------------------------------------------------------------------
# Table


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:.6g}"
    return str(value)


def format_table(result: dict[str, Any]) -> str:
    """A readable multi-section table of a metrics.json dict."""
    p, c, lk = result["protocol"], result["collapse"], result["likelihood"]
    rows: list[tuple[str, str]] = []

    def section(title):
        rows.append((f"[{title}]", ""))

    section("run")
    rows += [("run", result["run_dir"]), ("checkpoint", f"{result['checkpoint']['file']} (step {_fmt(result['checkpoint']['step'])})"),
             ("dataset / split", f"{result['run']['dataset']} / {p['split']} ({p['num_examples']} examples, D={p['num_elements']})"),
             ("model / policy", f"{result['run']['arch']}, q={c['latent_dim']} / {result['run']['policy']}"
              + (f", prior {result['run']['prior']}" if learnable_prior(result["run"].get("prior")) else ""))]
    section("collapse")
    few = c["latent_dim"] <= 64  # one number per unit in the table; more units: per group, every unit in the JSON
    rows += [("active units", f"{c['active_units']} / {c['latent_dim']}  (Var(mu_j) > {p['active_threshold']})"),
             *([("groups (active/units, KL)", "  ".join(f"{g['name']}: {g['active_units']}/{g['units']}, "
                                                       f"{_fmt(g['kl'], 3)}" for g in c["groups"])
                 + f"  ({c['collapsed_groups']} collapsed)")] if len(c.get("groups") or []) > 1 else []),
             ("KL total (nats)", _fmt(c["kl_total"])),
             ("KL per dim", (" ".join(_fmt(v, 3) for v in c["kl_per_dim"]) if few else "(per group above; every unit "
                             "in metrics.json)") if c["kl_per_dim"] is not None
              else "- (not defined under a non-factorised prior)"),
             ("I(x;z) (nats)", f"{_fmt(c['mutual_information'])}  (max log N = {_fmt(c['mutual_information_max'])})"
              + ("" if len(c.get("groups") or []) < 2 else f", top group {c['groups'][0]['name']}")),
             ("smoothness E||df/dz_j||", _fmt(c["smoothness_mean"]) + ("  per dim: " + " ".join(_fmt(v, 3) for v in c["smoothness_per_dim"])
                                                               if c["smoothness_per_dim"] and few else ""))]
    section("likelihood")
    ne, na, isn = lk["neg_elbo"], lk["neg_elbo_ar"], lk["is_nll"]
    rows += [("sigma2 (ar, eval set)", _fmt(lk["sigma2_ar"])),
             (f"-ELBO ({lk['policy']})", f"{_fmt(ne['neg_elbo'])} nats, {_fmt(ne['bits_per_dim'])} bits/dim  [sigma2: {ne['sigma2_source']}]"),
             ("-ELBO (ar sigma2)", f"{_fmt(na['neg_elbo'])} nats, {_fmt(na['bits_per_dim'])} bits/dim"),
             (f"IS-NLL (K={p['is_nll']['k']}, n={p['is_nll']['num_examples']})",
              "-" if isn is None else f"{_fmt(isn['nll'])} +- {_fmt(isn['stderr'], 2)} nats, {_fmt(isn['bits_per_dim'])} bits/dim")]
    if lk.get("exact_nll"):
        rows.append(("exact NLL (linear)", f"{_fmt(lk['exact_nll']['nll'])} nats"))
    rows += [("MSE (posterior mean)", _fmt(lk["mse"])), ("rate / distortion", f"{_fmt(ne['rate'])} / {_fmt(ne['distortion'])}")]
    if p["samplers"]:
        section("samples")
        for name, info in p["samplers"].items():
            res = result["fid"].get(name, {})
            if "fid" in res:
                text = f"FID {_fmt(res['fid'])}"
                if res.get("kid_mean") is not None:
                    text += f", KID {_fmt(res['kid_mean'])} +- {_fmt(res.get('kid_std'), 2)}"
                text += f"  ({res['protocol']['feature_net']}, {res['protocol']['n_generated']} vs {res['protocol']['n_reference']})"
            elif "error" in res:
                text = f"FID failed: {res['error']}"
            elif "skipped" in res:
                text = f"FID skipped: {res['skipped']}"
            else:
                text = "no samples drawn"
            rows.append((f"{name} ({info['source']})", text))
    rows.append(("time (s)", _fmt(result["timings_s"].get("total"))))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a}" if a.startswith("[") else f"  {a:<{width}}  {b}" for a, b in rows)

