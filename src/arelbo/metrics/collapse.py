"""Posterior-collapse diagnostics for any Gaussian encoder/decoder pair (pure PyTorch).

Every function takes plain tensors or ``(model, loader)`` and works in batches; nothing here needs gradients
except :func:`decoder_smoothness`, which uses forward-mode autograd (Jacobian-vector products) and nothing else.

Conventions. ``mu`` and ``logvar`` are (N, q) posterior means and log-variances of q(z|x) = N(mu, diag(exp(logvar)))
over an evaluation set; ``model`` is a model of :mod:`arelbo.models` (its forward returns the named
:class:`~arelbo.models.ModelOutput`, its ``encode(x)`` the named posterior of the code samplers model); a loader
yields float batches (B, ...) or ``(x, labels)`` tuples.

What is measured (method.md section 4):

- active units (Burda et al. 2016): unit j is active iff Var_x(E_q[z_j]) = Var_x(mu_j) > threshold
  (:data:`ACTIVE_UNIT_THRESHOLD`, 0.01);
- KL per latent dimension: the data mean of KL(q(z_j|x) || N(0, 1));
- mutual information I(x; z) under the aggregate posterior (estimator and bias in :func:`mutual_information`);
- decoder smoothness: the data mean of ||df/dz_j|| at the posterior means, one value per latent dimension;
- the sigma2 the ``ar`` rule gives on the whole evaluation set (isotropic and diagonal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "ACTIVE_UNIT_THRESHOLD",
    "ActiveUnits",
    "RunningMoments",
    "active_units",
    "active_units_from_loader",
    "kl_per_dim",
    "mutual_information",
    "mutual_information_per_dim",
    "decoder_smoothness",
    "normalised_smoothness",
    "encode_dataset",
    "batch_sq_err",
    "ar_sigma2",
    "iterate_batches",
]

ACTIVE_UNIT_THRESHOLD = 0.01  # unit j is active iff Var_x(E_q[z_j]) > this (Burda et al. 2016); used everywhere

LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------------------------------
# Loader helpers


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a parameter-free model
        return torch.device("cpu")


def iterate_batches(
    loader: Iterable,
    device: torch.device | str | None = None,
    max_examples: int | None = None,
    progress: bool | str = False,
) -> Iterable[Tensor]:
    """The x of each batch (labels dropped), moved to ``device``, stopping after ``max_examples`` examples.

    ``progress``: False, True, or a description string for a tqdm bar (on stderr).
    """
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = None
        try:
            total = len(loader.dataset)  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            pass
        if max_examples is not None:
            total = max_examples if total is None else min(total, max_examples)
        bar = tqdm(total=total, desc=progress if isinstance(progress, str) else None, unit="ex", leave=False)
    seen = 0
    try:
        for batch in loader:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if max_examples is not None and seen + x.shape[0] > max_examples:
                x = x[: max_examples - seen]
            if device is not None:
                x = x.to(device, non_blocking=True)
            seen += x.shape[0]
            if bar is not None:
                bar.update(x.shape[0])
            yield x
            if max_examples is not None and seen >= max_examples:
                break
    finally:
        if bar is not None:
            bar.close()


def _randn(shape, generator: torch.Generator | None, dtype, device) -> Tensor:
    """Standard normals drawn on the generator's device (so a CPU generator drives any device), then moved."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, dtype=dtype, device=gen_device).to(device)


def encode_dataset(
    model, loader: Iterable, max_examples: int | None = None, progress: bool | str = False
) -> tuple[Tensor, Tensor]:
    """Posterior means and log-variances (N, q) of every example, float32 on the CPU, under inference mode: of the
    code ex-post samplers model (``model.encode``: a flat VAE's z, a hierarchy's top group)."""
    device = _model_device(model)
    mus, logvars = [], []
    with torch.inference_mode():
        for x in iterate_batches(loader, device, max_examples, progress):
            posterior = model.encode(x)
            mus.append(posterior.mu.float().cpu())
            logvars.append(posterior.logvar.float().cpu())
    if not mus:
        raise ValueError("the loader yielded no examples")
    return torch.cat(mus), torch.cat(logvars)


# --------------------------------------------------------------------------------------------------------------
# Active units


@dataclass(frozen=True)
class ActiveUnits:
    """count: number of active units; mask: (q,) bool; variance: (q,) Var_x(mu_j); threshold used."""

    count: int
    mask: Tensor
    variance: Tensor
    threshold: float


class RunningMoments:
    """Streaming per-dimension mean and variance (Chan et al.'s parallel update in float64): feed (B, q) batches.

    ``variance(unbiased=False)`` divides by N (the population variance of the evaluation set).
    """

    def __init__(self):
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, values: Tensor) -> None:
        values = values.detach().to(torch.float64).reshape(values.shape[0], -1)
        n = values.shape[0]
        if n == 0:
            return
        batch_mean = values.mean(0)
        batch_m2 = (values - batch_mean).pow(2).sum(0)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, batch_mean, batch_m2
            return
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta.pow(2) * (self.count * n / total)
        self.count = total

    def variance(self, unbiased: bool = False) -> Tensor:
        if self.mean is None:
            raise ValueError("no values seen")
        denom = self.count - 1 if unbiased else self.count
        if denom < 1:
            raise ValueError(f"need at least {2 if unbiased else 1} values, got {self.count}")
        return self.m2 / denom


def _active(variance: Tensor, threshold: float) -> ActiveUnits:
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    variance = variance.detach().to(torch.float64).cpu()
    mask = variance > threshold
    return ActiveUnits(int(mask.sum()), mask, variance, float(threshold))


def active_units(mu: Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD, unbiased: bool = False) -> ActiveUnits:
    """Active units of posterior means ``mu`` (N, q): unit j is active iff Var_x(mu_j) > ``threshold``.

    The variance is over the N examples, divided by N (``unbiased=True``: by N - 1), computed in float64.
    """
    if mu.dim() != 2 or mu.shape[0] < 1:
        raise ValueError(f"mu must be (N, q) with N >= 1, got {tuple(mu.shape)}")
    moments = RunningMoments()
    moments.update(mu)
    return _active(moments.variance(unbiased), threshold)


def active_units_from_loader(
    model,
    loader: Iterable,
    threshold: float = ACTIVE_UNIT_THRESHOLD,
    unbiased: bool = False,
    max_examples: int | None = None,
    progress: bool | str = False,
) -> ActiveUnits:
    """:func:`active_units` streamed over a loader: memory O(q), one encoder pass under inference mode."""
    device = _model_device(model)
    moments = RunningMoments()
    with torch.inference_mode():
        for x in iterate_batches(loader, device, max_examples, progress):
            output = model(x, sample=False)  # every group at its posterior mean given the groups above
            moments.update(torch.cat([g.mu.flatten(1) for g in output.groups], 1))
    return _active(moments.variance(unbiased), threshold)


# --------------------------------------------------------------------------------------------------------------
# KL and mutual information


def kl_per_dim(mu: Tensor, logvar: Tensor) -> Tensor:
    """(q,) data mean of KL(N(mu_j, exp(logvar_j)) || N(0, 1)) in nats; the sum over j is the mean total KL."""
    if mu.shape != logvar.shape or mu.dim() != 2:
        raise ValueError(f"mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} must both be (N, q)")
    mu, logvar = mu.double(), logvar.double()
    return (0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0)).mean(0)


def _log_q_matrix(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z_i; mu_n, diag(exp(logvar_n))) for all pairs, (M, N), by expanding the square into matmuls (float64)."""
    inv = torch.exp(-logvar)  # (N, q)
    quad = z.pow(2) @ inv.T - 2.0 * z @ (mu * inv).T + (mu.pow(2) * inv).sum(1)  # (M, N)
    return -0.5 * (quad + logvar.sum(1) + mu.shape[1] * LOG_2PI)


def mutual_information(
    mu: Tensor,
    logvar: Tensor,
    n_samples: int = 1,
    generator: torch.Generator | None = None,
    chunk_size: int = 1024,
) -> float:
    """Estimate of I(x; z) in nats under the aggregate posterior of the evaluation set.

    With x uniform on the N evaluation examples and q(z) = (1/N) sum_n q(z|x_n) (the aggregate posterior),

        I(x; z) = E_x [ KL(q(z|x) || q(z)) ] = E_x E_{q(z|x)} [ log q(z|x) - log q(z) ].

    The estimator draws ``n_samples`` z_i ~ q(z|x_i) per example and averages log q(z_i|x_i) - log q(z_i), where
    log q(z_i) = logsumexp_n log q(z_i|x_n) - log N is the exact mixture density over *all* N examples (the
    usual minibatch estimator, here with the whole evaluation set as the batch; O(N^2 q) in float64 matmuls,
    chunked over i). Properties:

    - it is the mutual information of the empirical joint (x uniform on the set), so it is bounded by
      H(x) = log N: every single term satisfies log q(z_i) >= log q(z_i|x_i) - log N (the mixture contains
      the n = i component), so the estimate is <= log N always, not only in expectation;
    - as an estimate of the population I(x; z) it is biased: the mixture over N points is itself an estimate of
      q(z), and a perfectly informative encoder reads log N however much more information it carries; compare
      values only at the same N (the evaluation protocol records it);
    - a collapsed posterior (q(z|x) the same for every x) gives exactly 0.
    """
    if mu.shape != logvar.shape or mu.dim() != 2 or mu.shape[0] < 1:
        raise ValueError(f"mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} must both be (N, q), N >= 1")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    mu, logvar = mu.detach().double(), logvar.detach().double()
    n = mu.shape[0]
    std = (0.5 * logvar).exp()
    log_n = math.log(n)
    total = torch.zeros((), dtype=torch.float64)
    with torch.inference_mode():
        for _ in range(n_samples):
            for start in range(0, n, chunk_size):
                m, s, lv = mu[start : start + chunk_size], std[start : start + chunk_size], logvar[start : start + chunk_size]
                eps = _randn(m.shape, generator, torch.float64, m.device)
                z = m + s * eps
                log_q_all = _log_q_matrix(z, mu, logvar)  # (b, N)
                # log q(z_i | x_i), computed directly (the diagonal entry without the matmul's cancellation)
                log_q_own = -0.5 * (eps.pow(2).sum(1) + lv.sum(1) + mu.shape[1] * LOG_2PI)
                rows = torch.arange(m.shape[0], device=m.device)
                log_q_all[rows, rows + start] = log_q_own
                log_q_agg = torch.logsumexp(log_q_all, dim=1) - log_n
                # the n = i term of the mixture is log_q_own: enforce the bound exactly against rounding
                log_q_agg = torch.maximum(log_q_agg, log_q_own - log_n)
                total += (log_q_own - log_q_agg).sum()
    return float(total / (n * n_samples))


# --------------------------------------------------------------------------------------------------------------
# Decoder smoothness


def mutual_information_per_dim(mu: Tensor, logvar: Tensor) -> Tensor:
    """(q,) I(x; z_j) in nats of each latent dimension alone, in its Gaussian form (not capped at log N).

    With x uniform on the N evaluation examples, q(z_j | x) = N(mu_j(x), s_j^2(x)) and V_j = Var_x(mu_j) +
    E_x[s_j^2] the variance of the aggregate posterior of z_j (Var with ddof 0),

        I_j = 1/2 log V_j - 1/2 E_x[log s_j^2(x)]
            = h(Gaussian of variance V_j) - E_x h(q(z_j | x)).

    It equals I(x; z_j) exactly when the aggregate posterior of z_j is Gaussian (e.g. a linear encoder of
    Gaussian data, where I_j = 1/2 log(1 + a_j^2 Var(x_j) / s_j^2)) and is otherwise an upper bound (the Gaussian
    has the largest entropy at a given variance). A collapsed dimension (mu_j constant, s_j = 1) gives exactly 0.
    Unlike the joint estimate :func:`mutual_information`, nothing caps it at log N, so informative dimensions stay
    comparable across runs; summing it over j is not I(x; z) (the dimensions' information overlaps).
    """
    if mu.shape != logvar.shape or mu.dim() != 2 or mu.shape[0] < 1:
        raise ValueError(f"mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} must both be (N, q), N >= 1")
    mu, logvar = mu.detach().double(), logvar.detach().double()
    aggregate = mu.var(0, unbiased=False) + logvar.exp().mean(0)
    return 0.5 * (aggregate.log() - logvar.mean(0))


def normalised_smoothness(smoothness: Tensor, mu: Tensor) -> Tensor:
    """(q,) E_x||df/dz_j(mu)|| * std_x(mu_j): decoder smoothness made invariant to rescaling a latent.

    Rescaling latent j by c (encoder mu_j -> c mu_j, decoder f(z) -> f(z with z_j / c)) divides df/dz_j by c
    and multiplies std(mu_j) by c, so the product is unchanged: it is the decoder's output change across the
    typical spread of the codes, comparable between runs whose latents have different scales. ``smoothness``:
    :func:`decoder_smoothness` at the rows of ``mu`` (N, q); std with ddof 0 over those rows.
    """
    if mu.dim() != 2 or smoothness.shape != (mu.shape[1],):
        raise ValueError(f"smoothness {tuple(smoothness.shape)} must be (q,) for mu (N, q) = {tuple(mu.shape)}")
    return (smoothness.double().cpu() * mu.detach().double().cpu().std(0, unbiased=False)).float()


def decoder_smoothness(
    decoder: Callable[[Tensor], Tensor],
    mu: Tensor,
    batch_size: int = 256,
    max_jvp_rows: int = 1024,
    units: Sequence[int] | None = None,
) -> Tensor:
    """(q,) data mean of ||df/dz_j (mu)||_2 per latent dimension j, at the posterior means ``mu`` (N, q).

    ``units``: measure only these dimensions (the others are NaN), for models with many latent units (a
    hierarchy's spatial groups), where one product per unit would cost one decoder pass per unit and example.

    Each column df/dz_j is one forward-mode Jacobian-vector product with the unit vector e_j
    (``torch.func.jvp``), the m directions of a batch vectorised with ``torch.func.vmap``: the decoder's primal
    pass is computed once per batch and only the tangents are batched (6x faster than a jvp on an m-times
    repeated batch, the same values). Batches of at most ``max_jvp_rows`` // m examples keep the tangents in cache.
    No backward graph is built. For a linear decoder f(z) = W z the result is exactly the column norms
    ||W_{:, j}||. The decoder must act row-wise (eval mode for batch norm).
    """
    from torch.func import jvp, vmap

    if mu.dim() != 2 or mu.shape[0] < 1:
        raise ValueError(f"mu must be (N, q) with N >= 1, got {tuple(mu.shape)}")
    q = mu.shape[1]
    try:
        ref = next(decoder.parameters())  # type: ignore[attr-defined]
        device, dtype = ref.device, ref.dtype
    except (AttributeError, StopIteration):
        device, dtype = mu.device, mu.dtype
    chosen = list(range(q)) if units is None else sorted({int(u) for u in units})
    if not chosen or chosen[0] < 0 or chosen[-1] >= q:
        raise ValueError(f"units must be dimensions in [0, {q}), got {units!r}")
    m_units = len(chosen)
    rows = max(1, min(batch_size, max_jvp_rows // m_units))
    eye = torch.eye(q, device=device, dtype=dtype)[chosen]  # (m, q): the directions measured
    total = torch.zeros(m_units, dtype=torch.float64)
    mu = mu.detach().clone()  # a normal tensor even if made under inference mode
    with torch.no_grad():
        for start in range(0, mu.shape[0], rows):
            m = mu[start : start + rows].to(device=device, dtype=dtype)
            b = m.shape[0]

            def column(direction: Tensor, m: Tensor = m) -> Tensor:  # df/dz . direction at every row of m
                return jvp(decoder, (m,), (direction.expand_as(m),))[1]

            columns = vmap(column)(eye)  # (m, b, *out)
            norms = columns.reshape(m_units, b, -1).double().norm(dim=2)  # (m, b)
            total += norms.sum(1).cpu()
    out = torch.full((q,), float("nan"), dtype=torch.float32)
    out[chosen] = (total / mu.shape[0]).float()
    return out


# --------------------------------------------------------------------------------------------------------------
# The sigma2 of the ar rule on an evaluation set


def batch_sq_err(
    model,
    x: Tensor,
    mode: str = "auto",
    generator: torch.Generator | None = None,
    output=None,
) -> Tensor:
    """Elementwise squared errors (B, D) of a batch (no grad handling: call inside a context).

    ``mode``: ``"sample"`` one reparameterised z ~ q(z|x) per example (what the ``ar`` rule sees in training; an
    unbiased estimate of E_q (x_d - f_d(z))^2); ``"exact"`` that expectation in closed form (LinearVAE's
    ``expected_sq_err``); ``"mean"`` z = mu (the reconstruction error of the posterior mean); ``"auto"``
    exact when the model offers it, else sample. ``output``: the model's output for x of that mode, when already
    computed.
    """
    from arelbo.models.outputs import generator_noise

    if mode == "auto":
        mode = "exact" if hasattr(model, "expected_sq_err") else "sample"
    if mode == "exact":
        if not hasattr(model, "expected_sq_err"):
            raise ValueError(f"sq_err mode 'exact' needs a model with expected_sq_err (LinearVAE), got {type(model).__name__}")
        return model.expected_sq_err(x).float()
    if mode not in ("sample", "mean"):
        raise ValueError(f"unknown sq_err mode {mode!r}; use auto, sample, exact or mean")
    if output is None:
        output = model(x, sample=mode == "sample", noise=generator_noise(generator))
    diff = x.flatten(1).float() - output.x_hat.flatten(1).float()
    return diff * diff


def ar_sigma2(
    model,
    loader: Iterable,
    diagonal: bool = False,
    mode: str = "auto",
    generator: torch.Generator | None = None,
    max_examples: int | None = None,
    progress: bool | str = False,
) -> Tensor:
    """The sigma2 the ``ar`` rule gives on a whole evaluation set: sum of squared errors / count.

    Isotropic: a scalar tensor, sum_{n,d} (x_nd - f_d(z_n))^2 / (N D); ``diagonal=True``: a (D,) tensor,
    sum_n (x_nd - f_d(z_n))^2 / N (the ``ar-diagonal`` rule). Accumulated in float64 under inference mode;
    ``mode`` as in :func:`batch_sq_err`. No floor is applied (that is the policy's business).
    """
    device = _model_device(model)
    total, count = None, 0
    with torch.inference_mode():
        for x in iterate_batches(loader, device, max_examples, progress):
            sq = batch_sq_err(model, x, mode, generator).double()
            part = sq.sum(0)
            total = part if total is None else total + part
            count += sq.shape[0]
    if total is None:
        raise ValueError("the loader yielded no examples")
    total = total.cpu()
    return total / count if diagonal else total.sum() / (count * total.numel())
