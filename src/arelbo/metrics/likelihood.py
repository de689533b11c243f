"""Likelihoods of a Gaussian VAE on an evaluation set: -ELBO (nats, bits/dim) and the importance-sampled NLL.

**-ELBO with sigma2 estimated on the evaluation set.** For a decoder variance sigma2 the mean -ELBO over N
examples with D elements each is (S_d = sum_n E_q (x_nd - f_d(z))^2, KL_n the rate of example n)

    isotropic:  sum_d S_d / (2 sigma2 N) + (D/2) log(2 pi sigma2) + mean_n KL_n
    diagonal:   sum_d [S_d / (2 sigma2_d N) + 1/2 log(2 pi sigma2_d)] + mean_n KL_n

so one pass that accumulates S_d, the KL per dimension and (for the per-sample rule) the per-example log
squared error gives the -ELBO at *any* sigma2 afterwards, including the ar-type maximum-likelihood values that
depend on the whole set: ``ar`` (and ``ar-ema``) sigma2 = sum_d S_d / (N D), where the -ELBO becomes
(D/2)(log(2 pi sigma2) + 1) + KL; ``ar-diagonal`` sigma2_d = S_d / N; ``ar-per-sample`` sigma2_n = ||x_n - f||^2 / D.
Fixed, beta and learned policies use their own sigma2; the conditional ones (a decoder with a variance head) the
model's own sigma2(z) per element, summed in the same pass (and, for the IS-NLL, :class:`OwnVariance`). Which rule a policy uses is the policy's own
:meth:`~arelbo.objectives.DecoderVariance.held_out_sigma2`. That is :class:`ELBOAccumulator`; no second pass is
needed, and training validation uses the same accumulator (its sums all-reduced across processes).

**Importance-sampled NLL.** -log p(x) ~= -log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x): an upper bound
in expectation that tightens as K grows and equals -log p(x) exactly for any K when q(z|x) is the true posterior.
K = 1 is a one-sample estimate of -ELBO. Computed as a stable running log-sum-exp in float64 over chunks of the K
samples, so memory is bounded whatever K is.

**Bits per dimension** = nats / (D ln 2), for the data on the scale it was given (images in [0, 1] as continuous
values; this is not the discrete 8-bit likelihood of dequantised pixels).

**Exact reference.** For a linear decoder f(z) = W z + b, p(x) = N(b, W W^T + diag(sigma2)) in closed form:
:func:`linear_gaussian_nll`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

import torch
from torch import Tensor

from arelbo.metrics.collapse import _model_device, batch_sq_err, iterate_batches
from arelbo.models.outputs import generator_noise

__all__ = [
    "ELBOAccumulator",
    "ELBOResult",
    "ISResult",
    "neg_elbo",
    "importance_sampled_nll",
    "importance_sampled_nll_dataset",
    "linear_gaussian_nll",
    "linear_vae_exact_nll",
    "bits_per_dim",
    "resolve_sigma2",
    "OwnVariance",
]

LOG_2PI = math.log(2.0 * math.pi)
LN2 = math.log(2.0)


def bits_per_dim(nats, num_elements: int):
    """nats per example -> bits per observed element."""
    return nats / (num_elements * LN2)


@dataclass(frozen=True)
class ELBOResult:
    neg_elbo: float  # mean -ELBO per example, nats
    bits_per_dim: float
    sigma2: float | list[float] | None  # scalar, (D,) list, or None (per-sample: see sigma2_mean)
    sigma2_mean: float  # arithmetic mean of the sigma2 entries used (per-sample: geometric mean over examples)
    sigma2_source: str  # e.g. "eval-set MLE, isotropic (ar)", "policy fixed", "given"
    distortion: float  # mean over examples of sum_d E_q (x_d - f_d(z))^2
    rate: float  # mean KL(q(z|x) || p(z)), nats (a Monte-Carlo estimate for a learnable prior)
    kl_per_dim: list[float] | None  # None: the rate was given per example (no closed-form KL per dimension)
    num_examples: int
    num_elements: int
    sq_err_mode: str  # how E_q (x - f(z))^2 was computed: "exact", "sample" or "mean"
    rate_per_group: dict[str, float] | None = None  # each latent group's mean rate (nats), groups in order

    def to_dict(self) -> dict:
        return asdict(self)


class ELBOAccumulator:
    """One pass of sums from which :meth:`result` gives the mean -ELBO at any sigma2 (see the module docstring).

    ``update_output(sq_err, output)`` with elementwise squared errors (B, D) (an estimate of, or exactly,
    E_q (x - f(z))^2) and the model's :class:`~arelbo.models.ModelOutput`: its rate, each group's rate, and the KL
    of every unit when all groups have one in closed form (a learnable prior's Monte-Carlo rate has none; then no KL
    per dimension is reported). ``update(sq_err, mu, logvar, rate=None)`` does the same for a flat posterior
    (B, q): the closed-form KL to N(0, I) unless the (B,) ``rate`` is given. Sums are kept in float64 on the
    inputs' device (no host sync per batch); :meth:`reduce` combines the sums of several processes.
    """

    def __init__(self, per_sample_floor: float = 1e-6):
        self.per_sample_floor = float(per_sample_floor)
        self.num_examples = 0
        self.sq_err_sum: Tensor | None = None  # (D,) S_d
        self.kl_sum: Tensor | None = None  # (q,) summed over examples, every unit of every group
        self._per_sample: Tensor | None = None  # (3,): sums over n of log sigma2_n, data term, sigma2_n
        # (2,): sums over n, d of the model's own sigma2(z) term r^2 / (2 s) + log(2 pi s) / 2 and of s (floored)
        self._conditional: Tensor | None = None
        self.has_x_logvar: bool | None = None  # whether the model's outputs carried a log-variance (x_logvar)
        self.rate_given: bool | None = None  # True: per-example rates were given (no closed-form KL per dimension)
        self._rate_sum: Tensor | None = None  # (1,) sum_n rate_n of the given rates (zero otherwise)
        self._group_rate_sum: Tensor | None = None  # (groups,) sum_n of each group's rate
        self.group_names: tuple[str, ...] = ("z",)
        self.sq_err_mode = "given"

    def update(self, sq_err: Tensor, mu: Tensor, logvar: Tensor, rate: Tensor | None = None) -> None:
        if sq_err.dim() != 2 or mu.shape != logvar.shape or mu.dim() != 2 or mu.shape[0] != sq_err.shape[0]:
            raise ValueError(f"need sq_err (B, D) and mu, logvar (B, q); got {tuple(sq_err.shape)}, {tuple(mu.shape)}, {tuple(logvar.shape)}")
        sq = sq_err.detach().double()
        kl = 0.5 * (mu.double().pow(2) + logvar.double().exp() - logvar.double() - 1.0).to(sq.device)
        if rate is not None:
            if rate.shape != (sq.shape[0],):
                raise ValueError(f"rate must have shape (B,) = ({sq.shape[0]},), got {tuple(rate.shape)}")
            rate = rate.detach().double().to(sq.device)
        self._add(sq, kl, rate, (kl.sum(1) if rate is None else rate)[:, None], ("z",))

    def update_output(self, sq_err: Tensor, output) -> None:
        """Add a batch from its squared errors (B, D) and the model's output (named groups and rates)."""
        if sq_err.dim() != 2 or output.rate.shape != (sq_err.shape[0],):
            raise ValueError(f"need sq_err (B, D) and the output of the same batch; got {tuple(sq_err.shape)} and a "
                             f"rate of shape {tuple(output.rate.shape)}")
        sq = sq_err.detach().double()
        kls = [g.kl_float64() for g in output.groups]
        group_rates = torch.stack([(kl.sum(1) if kl is not None else g.rate.detach().double()).to(sq.device)
                                   for g, kl in zip(output.groups, kls)], 1)
        if all(kl is not None for kl in kls):
            kl, rate = torch.cat(kls, 1).to(sq.device), None
        else:
            kl = torch.zeros(sq.shape[0], sum(g.num_units for g in output.groups), dtype=torch.float64, device=sq.device)
            rate = output.rate.detach().double().to(sq.device)
        self._add(sq, kl, rate, group_rates, tuple(g.name for g in output.groups), getattr(output, "x_logvar", None))

    def _add(self, sq: Tensor, kl: Tensor, rate: Tensor | None, group_rates: Tensor, names: tuple[str, ...],
             x_logvar: Tensor | None = None) -> None:
        if self.rate_given is not None and self.rate_given != (rate is not None):
            raise ValueError("give the rate for every batch or for none")
        if rate is not None:
            kl = torch.zeros_like(kl)  # no closed-form KL per dimension under a learnable prior
        self.rate_given = rate is not None
        rate_sum = sq.new_zeros(1) if rate is None else rate.sum().reshape(1)
        per = sq.sum(1)
        s2 = (per / sq.shape[1]).clamp_min(self.per_sample_floor)  # the per-sample MLE, floored
        per_sample = torch.stack([s2.log().sum(), (per / (2 * s2)).sum(), s2.sum()])
        conditional = sq.new_zeros(2)
        if x_logvar is not None:  # the decoder's own sigma2(z), per element, floored as in training
            s = x_logvar.detach().double().flatten(1).to(sq.device).exp().clamp_min(self.per_sample_floor)
            conditional = torch.stack([(sq / (2 * s) + 0.5 * (LOG_2PI + s.log())).sum(), s.sum()])
        self.has_x_logvar = x_logvar is not None
        if self.sq_err_sum is None:
            self.sq_err_sum, self.kl_sum, self._per_sample = sq.sum(0), kl.sum(0), per_sample
            self._rate_sum, self._group_rate_sum, self.group_names = rate_sum, group_rates.sum(0), names
            self._conditional = conditional
        else:
            self.sq_err_sum += sq.sum(0)
            self.kl_sum += kl.sum(0)
            self._per_sample += per_sample
            self._rate_sum += rate_sum
            self._group_rate_sum += group_rates.sum(0)
            self._conditional += conditional
        self.num_examples += sq.shape[0]

    def start_empty(self, num_elements: int, num_units: int, group_names: tuple[str, ...], rate_given: bool,
                    device=None) -> None:
        """Zero sums of the right sizes for a process that saw no example (its share of :meth:`reduce`)."""
        if self.sq_err_sum is not None:
            return
        z = lambda n: torch.zeros(n, dtype=torch.float64, device=device)  # noqa: E731
        self.sq_err_sum, self.kl_sum, self._per_sample, self._rate_sum = z(num_elements), z(num_units), z(3), z(1)
        self._group_rate_sum, self.group_names, self.rate_given = z(len(group_names)), tuple(group_names), rate_given
        self._conditional = z(2)

    def reduce(self, all_reduce) -> None:
        """Replace the sums by their totals over processes: ``all_reduce(flat_float64_tensor) -> summed``."""
        self._check()
        parts = [self.sq_err_sum, self.kl_sum, self._per_sample, self._rate_sum, self._group_rate_sum,
                 self.sq_err_sum.new_tensor([float(self.num_examples)]), self._conditional]
        sizes = [p.numel() for p in parts]
        flat = all_reduce(torch.cat([p.reshape(-1) for p in parts]))
        pieces = [piece.clone() for piece in torch.split(flat, sizes)]
        self.sq_err_sum, self.kl_sum, self._per_sample, self._rate_sum, self._group_rate_sum = pieces[:5]
        self.num_examples = int(round(float(pieces[5][0])))
        self._conditional = pieces[6]

    @property
    def per_sample_log_sigma2_sum(self) -> float:
        """sum_n log max(||x_n - f||^2 / D, floor)"""
        return float(self._per_sample[0]) if self._per_sample is not None else 0.0

    @property
    def per_sample_data_sum(self) -> float:
        """sum_n ||x_n - f||^2 / (2 sigma2_n)"""
        return float(self._per_sample[1]) if self._per_sample is not None else 0.0

    @property
    def per_sample_sigma2_mean(self) -> float:
        """Arithmetic mean over examples of the floored per-example MLE sigma2_n."""
        self._check()
        return float(self._per_sample[2]) / self.num_examples

    @property
    def num_elements(self) -> int:
        self._check()
        return int(self.sq_err_sum.numel())

    def _check(self):
        if self.sq_err_sum is None:
            raise ValueError("no examples accumulated")

    def ar_sigma2(self, diagonal: bool = False) -> Tensor:
        """The eval-set maximum-likelihood sigma2: scalar sum S_d / (N D), or (D,) S_d / N (no floor)."""
        self._check()
        per_dim = self.sq_err_sum.cpu() / self.num_examples
        return per_dim if diagonal else per_dim.mean()

    def result(self, sigma2, floor: float = 1e-6, source: str | None = None) -> ELBOResult:
        """-ELBO at ``sigma2``: a policy name / DecoderVariance / GaussianVAELoss (ar-type policies get their
        eval-set MLE), a positive number, a () or (D,) tensor. See :func:`resolve_sigma2`."""
        self._check()
        n, d = self.num_examples, self.num_elements
        kl_mean = self.kl_sum.cpu() / n
        rate = float(self._rate_sum.cpu()[0]) / n if self.rate_given else float(kl_mean.sum())
        value, kind, auto_source = resolve_sigma2(sigma2, self, floor)
        if kind == "conditional":  # the model's own sigma2(z) per element and example
            if self.has_x_logvar is False:
                raise ValueError("the -ELBO at the model's own sigma2(z) needs outputs with x_logvar (a variance head)")
            data = float(self._conditional[0].cpu()) / n
            sigma2_out, sigma2_mean = None, float(self._conditional[1].cpu()) / (n * d)
        elif kind == "per-sample":
            data = (self.per_sample_data_sum + 0.5 * d * (n * LOG_2PI + self.per_sample_log_sigma2_sum)) / n
            sigma2_out, sigma2_mean = None, math.exp(self.per_sample_log_sigma2_sum / n)  # geometric mean
        elif kind == "isotropic":
            s = value.double()
            data = float(self.sq_err_sum.sum().cpu() / (2 * s * n) + 0.5 * d * (LOG_2PI + torch.log(s)))
            sigma2_out = sigma2_mean = float(s)
        else:  # diagonal
            s = value.double().cpu()
            if s.shape != (d,):
                raise ValueError(f"diagonal sigma2 must have shape ({d},), got {tuple(s.shape)}")
            data = float((self.sq_err_sum.cpu() / (2 * s * n) + 0.5 * (LOG_2PI + torch.log(s))).sum())
            sigma2_out, sigma2_mean = s.tolist(), float(s.mean())
        total = data + rate
        return ELBOResult(
            neg_elbo=total,
            bits_per_dim=bits_per_dim(total, d),
            sigma2=sigma2_out,
            sigma2_mean=sigma2_mean,
            sigma2_source=source or auto_source,
            distortion=float(self.sq_err_sum.sum().cpu() / n),
            rate=rate,
            kl_per_dim=None if self.rate_given else kl_mean.tolist(),
            num_examples=n,
            num_elements=d,
            sq_err_mode=self.sq_err_mode,
            rate_per_group={name: float(v) / n for name, v in zip(self.group_names, self._group_rate_sum.cpu().tolist())},
        )


def resolve_sigma2(spec, acc: ELBOAccumulator | None = None, floor: float = 1e-6) -> tuple[Tensor | None, str, str]:
    """Turn a sigma2 spec into (value, kind, description); kind is "isotropic", "diagonal" or "per-sample".

    ``spec``: a positive number or () tensor (isotropic), a (D,) tensor (diagonal), a policy name, a
    :class:`~arelbo.objectives.DecoderVariance` or a :class:`~arelbo.objectives.GaussianVAELoss`. A policy gives
    its own held-out rule (:meth:`~arelbo.objectives.DecoderVariance.held_out_sigma2`: ar-type policies the
    eval-set MLE, floored at the policy's floor; fixed, beta and learned their own value). A name is built with
    ``floor``.
    """
    from arelbo.objectives import DecoderVariance, GaussianVAELoss, make_policy

    if isinstance(spec, GaussianVAELoss):
        spec = spec.policy
    if isinstance(spec, str):
        spec = make_policy(spec, floor=floor)
    if isinstance(spec, DecoderVariance):
        return tuple(spec.held_out_sigma2(acc))
    value = torch.as_tensor(spec, dtype=torch.float64).detach().cpu()
    if not bool(torch.isfinite(value).all()) or not bool((value > 0).all()):
        raise ValueError(f"sigma2 must be positive and finite, got {spec!r}")
    if value.dim() == 0:
        return value, "isotropic", "given"
    if value.dim() == 1:
        return value, "diagonal", "given"
    raise ValueError(f"sigma2 must be a scalar or a (D,) tensor, got shape {tuple(value.shape)}")


def neg_elbo(
    model,
    loader: Iterable,
    sigma2="ar",
    sq_err: str = "auto",
    generator: torch.Generator | None = None,
    max_examples: int | None = None,
    progress: bool | str = False,
) -> ELBOResult:
    """Mean -ELBO (nats and bits/dim) of ``model`` on the examples of ``loader``, one pass under inference mode.

    ``sigma2``: a policy (name, DecoderVariance or the run's GaussianVAELoss) or a value, see
    :func:`resolve_sigma2`; ar-type policies get sigma2 estimated on this evaluation set. ``sq_err``: how
    E_q (x - f(z))^2 is computed (:func:`arelbo.metrics.collapse.batch_sq_err`: auto = exact for a LinearVAE,
    else one reparameterised sample per example).
    """
    acc = ELBOAccumulator()
    device = _model_device(model)
    mode = sq_err
    if mode == "auto":
        mode = "exact" if hasattr(model, "expected_sq_err") else "sample"
    noise = generator_noise(generator)
    with torch.inference_mode():
        for x in iterate_batches(loader, device, max_examples, progress):
            output = model(x, sample=mode != "mean", noise=noise)
            acc.update_output(batch_sq_err(model, x, mode, output=None if mode == "exact" else output), output)
    acc.sq_err_mode = mode
    return acc.result(sigma2)


# --------------------------------------------------------------------------------------------------------------
# Importance sampling


def _sigma2_rows(sigma2, batch: int, dim: int, device) -> Tensor:
    """sigma2 as a float64 tensor broadcastable against (K, B, D): (), (D,) or per-example (B, 1)."""
    s = torch.as_tensor(sigma2, dtype=torch.float64).detach().to(device)
    if s.dim() == 0 or (s.dim() == 1 and s.shape[0] == dim):
        pass
    elif s.dim() == 2 and s.shape == (batch, 1):
        pass
    else:
        raise ValueError(f"sigma2 must be a scalar, (D,) = ({dim},) or per-example (B, 1) = ({batch}, 1); got {tuple(s.shape)}")
    if not bool((s > 0).all()):
        raise ValueError("sigma2 must be positive")
    return s


def importance_sampled_nll(
    model,
    x: Tensor,
    sigma2,
    k: int = 100,
    generator: torch.Generator | None = None,
    k_chunk: int | None = None,
    max_elements: int = 1 << 19,
) -> Tensor:
    """(B,) importance-sampled -log p(x) in nats with ``k`` samples from q(z|x) (see the module docstring).

    ``sigma2``: scalar, (D,), or per-example (B, 1). The K samples go through the decoder ``k_chunk`` at a time
    (default: as many as fit ``max_elements`` decoded values: ~670 MNIST images, where a CPU decoder runs fastest;
    10,000 at a time ran at half the speed), accumulated by a running log-sum-exp in float64.
    Runs under inference mode.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if isinstance(sigma2, OwnVariance):
        return _own_variance_nll(model, x, sigma2.floor, k, generator, k_chunk, max_elements)
    with torch.inference_mode():
        b = x.shape[0]
        x_flat = x.flatten(1).double()
        d = x_flat.shape[1]
        s = _sigma2_rows(sigma2, b, d, x.device)
        log_det = (torch.log(s).sum() if s.dim() == 1 else d * torch.log(s).reshape(-1))  # () or (B,)
        const = -0.5 * (d * LOG_2PI + log_det)
        if k_chunk is None:
            k_chunk = max(1, min(k, max_elements // max(1, b * d)))
        running = None
        done = 0
        while done < k:
            kc = min(k_chunk, k - done)
            x_hat, log_prior_ratio = model.log_weights(x, kc, generator)  # (kc, B, ...), log p(z) - log q(z|x)
            resid2 = (x_flat - x_hat.reshape(kc, b, d).double()).pow(2)
            data = (resid2 / s).sum(2) if s.dim() == 1 else resid2.sum(2) / s.reshape(-1)
            log_px = const - 0.5 * data  # (kc, B)
            chunk = torch.logsumexp(log_px + log_prior_ratio, dim=0)
            running = chunk if running is None else torch.logaddexp(running, chunk)
            done += kc
        return -(running - math.log(k))


@dataclass(frozen=True)
class OwnVariance:
    """The ``sigma2`` of :func:`importance_sampled_nll` for a decoder with a variance head: at each draw z_k the
    decoder's own sigma2(z_k) per element, floored at ``floor`` (as in training)."""

    floor: float = 1e-6


def _own_variance_nll(model, x: Tensor, floor: float, k: int, generator, k_chunk: int | None,
                      max_elements: int) -> Tensor:
    """:func:`importance_sampled_nll` with log p(x|z_k) = sum_d log N(x_d; f_d(z_k), sigma2_d(z_k))."""
    with torch.inference_mode():
        b = x.shape[0]
        x_flat = x.flatten(1).double()
        d = x_flat.shape[1]
        k_chunk = k_chunk or max(1, min(k, max_elements // max(1, b * d)))
        running, done = None, 0
        while done < k:
            kc = min(k_chunk, k - done)
            draws = model.log_weights(x, kc, generator, variance=True)
            s = draws.x_logvar.reshape(kc, b, d).double().exp().clamp_min(floor)
            resid2 = (x_flat - draws.x_hat.reshape(kc, b, d).double()).pow(2)
            log_px = -0.5 * (resid2 / s + s.log() + LOG_2PI).sum(2)  # (kc, B)
            chunk = torch.logsumexp(log_px + draws.log_ratio, dim=0)
            running = chunk if running is None else torch.logaddexp(running, chunk)
            done += kc
        return -(running - math.log(k))


@dataclass(frozen=True)
class ISResult:
    nll: float  # mean importance-sampled -log p(x), nats per example
    bits_per_dim: float
    stderr: float  # standard error of the mean over examples (spread across x, not the IS bias)
    k: int
    num_examples: int
    num_elements: int

    def to_dict(self) -> dict:
        return asdict(self)


def importance_sampled_nll_dataset(
    model,
    loader: Iterable,
    sigma2,
    k: int = 100,
    generator: torch.Generator | None = None,
    max_examples: int | None = None,
    progress: bool | str = False,
    k_chunk: int | None = None,
) -> ISResult:
    """:func:`importance_sampled_nll` averaged over a loader's examples (``sigma2`` scalar or (D,))."""
    device = _model_device(model)
    values = []
    for x in iterate_batches(loader, device, max_examples, progress):
        values.append(importance_sampled_nll(model, x, sigma2, k, generator, k_chunk).cpu())
    if not values:
        raise ValueError("the loader yielded no examples")
    v = torch.cat(values)
    d = int(math.prod(x.shape[1:]))
    mean = float(v.mean())
    stderr = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return ISResult(mean, bits_per_dim(mean, d), stderr, int(k), len(v), d)


# --------------------------------------------------------------------------------------------------------------
# Exact linear-Gaussian reference


def linear_gaussian_nll(x: Tensor, W: Tensor, sigma2, bias: Tensor | None = None) -> Tensor:
    """(B,) exact -log N(x; b, W W^T + diag(sigma2)) in nats (float64), x (B, D) or (B, ...), W (D, q)."""
    x = x.flatten(1).double()
    W = W.detach().double().to(x.device)
    d = W.shape[0]
    if x.shape[1] != d:
        raise ValueError(f"x has {x.shape[1]} elements per example but W has {d} rows")
    s = torch.as_tensor(sigma2, dtype=torch.float64, device=x.device).detach()
    cov = W @ W.T + (torch.diag(s) if s.dim() == 1 else s * torch.eye(d, dtype=torch.float64, device=x.device))
    if bias is not None:
        x = x - bias.detach().double().to(x.device)
    chol = torch.linalg.cholesky(cov)
    sol = torch.linalg.solve_triangular(chol, x.T, upper=False)  # (D, B)
    maha = sol.pow(2).sum(0)
    log_det = 2.0 * torch.log(torch.diagonal(chol)).sum()
    return 0.5 * (maha + log_det + d * LOG_2PI)


def linear_vae_exact_nll(model, x: Tensor, sigma2) -> Tensor:
    """(B,) exact -log p(x) of a :class:`~arelbo.models.LinearVAE` (decoder W z + b) at decoder variance sigma2."""
    lin = model.decoder.linear
    return linear_gaussian_nll(x, lin.weight, sigma2, lin.bias)
