"""What every decoder-variance policy shares: the loss's output, the -ELBO per sample, the policy base class and
its registry, and the all-reduce that keeps data-estimated sigma2 global under DDP."""

from __future__ import annotations

import inspect
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from arelbo.models.outputs import gaussian_kl, upcast  # noqa: F401 (part of this module's API)
from arelbo.registry import build, register

__all__ = [
    "LossOutput",
    "NonFiniteError",
    "DecoderVariance",
    "HeldOutSigma2",
    "PolicyOption",
    "policy_options",
    "DEFAULT_POLICY",
    "POLICIES",
    "register_policy",
    "make_policy",
    "gaussian_kl",
    "neg_elbo_per_sample",
    "format_number",
]

LOG_2PI = math.log(2.0 * math.pi)
DEFAULT_POLICY = "ar"  # AR-ELBO, isotropic: the method this package is about


class NonFiniteError(ValueError):
    """The loss came out NaN or inf; the message names the input that holds NaN or inf when there is one."""


@dataclass(frozen=True)
class LossOutput:
    """What one call of the loss returns. Per-sample tensors have shape (B,)."""

    loss: Tensor  # scalar to minimise (carries gradient)
    distortion: Tensor  # (B,) squared error ||x - x_hat||^2 summed over the D elements
    rate: Tensor  # (B,) KL(q(z|x) || p(z)) in nats (a Monte-Carlo estimate when it was given to the loss)
    kl_per_dim: Tensor  # (q,) batch mean of the KL of each latent dimension; NaN when the rate was given
    sigma2: Tensor  # the decoder variance used, detached: shape (), (D,), (B,) or (B, D) (conditional: sigma2(z))
    neg_elbo: Tensor  # scalar: batch mean of -ELBO in nats, all constants included
    bits_per_dim: Tensor  # scalar: neg_elbo / (D ln 2), for the data on the scale it was given
    num_elements: int  # D
    pending_check: Tensor | None = None  # a deferred finiteness check (accelerators, check_finite="auto")

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteError` if a deferred finiteness check failed (one device sync)."""
        if self.pending_check is not None and not bool(self.pending_check):
            raise NonFiniteError(
                "the loss is NaN or inf: some input (x, x_hat, mu or logvar) holds NaN or inf, or sigma2 overflowed"
            )

    @property
    def sigma2_mean(self) -> Tensor:
        """A scalar summary of sigma2 for logging (the arithmetic mean of its entries)."""
        return self.sigma2.float().mean()

    def scalars(self) -> dict[str, float]:
        """Detached Python floats for loggers (one device sync; runs a deferred finiteness check)."""
        self.check_finite()
        values = torch.stack(
            [
                self.loss.detach().float(),
                self.distortion.detach().float().mean(),
                self.rate.detach().float().mean(),
                self.sigma2_mean,
                self.neg_elbo.detach().float(),
                self.bits_per_dim.detach().float(),
            ]
        ).tolist()
        names = ("loss", "distortion", "rate", "sigma2", "neg_elbo", "bits_per_dim")
        return dict(zip(names, values))


def neg_elbo_per_sample(sq_err: Tensor, sigma2: Tensor, rate: Tensor) -> Tensor:
    """Exact -ELBO per sample in nats for elementwise squared errors (B, D) and a broadcastable sigma2."""
    num_elements = sq_err.shape[1]
    sigma2 = _as_elementwise(sigma2, sq_err)
    if sigma2.dim() == 0:  # scalar: avoid materialising a (B, D) log
        data = sq_err.sum(1) / (2 * sigma2) + 0.5 * num_elements * (LOG_2PI + torch.log(sigma2))
    else:
        data = (sq_err / (2 * sigma2) + 0.5 * (LOG_2PI + torch.log(sigma2))).sum(1)
    return data + rate


def _as_elementwise(sigma2: Tensor, sq_err: Tensor) -> Tensor:
    """Shape a policy's sigma2 so it broadcasts against (B, D): () stays, (D,) stays, (B,) becomes (B, 1).

    A 1-D sigma2 of length D is always per-element (policies return (B, 1) for per-sample), so a batch whose
    size happens to equal D is not ambiguous.
    """
    if sigma2.dim() == 1 and sigma2.shape[0] != sq_err.shape[1] and sigma2.shape[0] == sq_err.shape[0]:
        return sigma2[:, None]
    return sigma2


def check_float(**tensors: Tensor) -> None:
    """Integer inputs would be silently read on their own scale (uint8 pixels give sigma2 ~ 1e4)."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(
                f"{name} has dtype {t.dtype}: the loss needs floating-point tensors (convert uint8 pixels to "
                "[0, 1] first, e.g. x.float() / 255 or arelbo.data.to_float)"
            )


def reduces(group=None, enabled: bool = True) -> bool:
    """Whether statistics are all-reduced: enabled, under torch.distributed, and more than one rank in ``group``."""
    return enabled and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def global_sums(*tensors: Tensor, group=None, enabled: bool = True) -> list[Tensor]:
    """All-reduce (sum) detached statistics across the ranks of ``group`` when running under torch.distributed."""
    if not reduces(group, enabled):
        return list(tensors)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].reshape(t.shape))
        start += t.numel()
    return out


# --------------------------------------------------------------------------------------------------------------
# Decoder-variance policies


class HeldOutSigma2(NamedTuple):
    """The sigma2 a policy's -ELBO uses on a held-out split: ``value`` (a float64 CPU tensor of shape () or (D,),
    or None for one value per example or the model's own sigma2(z)), ``kind`` ("isotropic", "diagonal",
    "per-sample" or "conditional": the decoder's log-variance output) and ``source`` (a description for reports)."""

    value: Tensor | None
    kind: str
    source: str


@dataclass(frozen=True)
class PolicyOption:
    """One option of a policy: a keyword argument of its constructor (validated there)."""

    name: str
    type: Any
    default: Any


class DecoderVariance(nn.Module):
    """How the decoder variance sigma2 is chosen: one class carries everything the library needs to know.

    Training: ``sigma2(sq_err)`` gets the elementwise squared errors (B, D) (detached unless the policy is learned)
    and returns a variance of shape () (isotropic), (D,) (one per element) or (B, 1) (one per sample). The
    default :meth:`loss` is the batch mean of -ELBO at that sigma2; with a detached maximum-likelihood sigma2 this
    is the AR-ELBO loss in its detached-MLE form.

    Evaluation: :meth:`held_out_sigma2` says which sigma2 the -ELBO uses on a held-out split, from the split's
    sums (an :class:`arelbo.metrics.ELBOAccumulator`); training validation and ``arelbo eval`` both call it. The
    default is the split's isotropic maximum-likelihood value (the AR-ELBO rule); a policy whose sigma2 is a
    given or learned value returns its own (:meth:`own_sigma2`). ``is_density``: False when the -ELBO at that
    sigma2 is not the bound of one density p(x) (a per-example sigma2); likelihood estimates then use the
    isotropic MLE (:meth:`density_sigma2`).

    Options: the keyword arguments of ``__init__`` (except ``floor``, which is ``objective.sigma2_floor``) are
    the policy's options, set in configs as ``objective.options.NAME``; the constructor validates them
    (``ValueError``). ``label`` names the policy in tables and figures.
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # display name (default: the name)
    is_density: ClassVar[bool] = True
    stationary: ClassVar[bool] = True  # False: the objective changes from call to call (running state)
    sigma2_kind: ClassVar[str] = "estimated"  # "estimated" from the data (ar-type), "given" or "learned"
    min_batch: ClassVar[int] = 1  # the smallest training batch (global) its sigma2 is defined on
    # True: sigma2 is the decoder's own output sigma2(z) (ModelOutput.x_logvar), given to ``sigma2(sq_err, x_logvar)``
    needs_x_logvar: ClassVar[bool] = False
    # Where the ar* policies all-reduce their statistics (set through GaussianVAELoss): the process group
    # (None: the default group) and whether to all-reduce at all.
    process_group = None
    all_reduce: bool = True

    def _sums(self, *tensors: Tensor) -> list[Tensor]:
        return global_sums(*tensors, group=self.process_group, enabled=self.all_reduce)

    def __init__(self, floor: float = 1e-6):
        super().__init__()
        if not floor > 0:
            raise ValueError(f"sigma2 floor must be > 0, got {floor}")
        self.floor = float(floor)

    def sigma2(self, sq_err: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, sq_err: Tensor, rate: Tensor, sigma2: Tensor) -> Tensor:
        return neg_elbo_per_sample(sq_err, sigma2, rate).mean()

    def optimizer_options(self) -> dict:
        """Optimiser options (e.g. ``{"lr": 1e-2}``) for this policy's own parameters; {}: the trainer's."""
        return {}

    def attach(self, model) -> None:
        """Bind the policy to the model it is about to train (once, before training; a resumed state is loaded
        over what it sets). Default: nothing; the conditional policies set up the decoder's variance head."""

    def head_optimizer_options(self) -> dict:
        """Optimiser options for the model's variance head (``model.variance_head``); {}: the model's."""
        return {}

    def mle_sigma2(self, sq_err: Tensor) -> Optional[Tensor]:
        """The maximum-likelihood sigma2 of this batch *with* its dependence on the parameters (not detached),
        for policies whose sigma2 is such an estimate (used for exact Hessians); None otherwise."""
        return None

    # ---- evaluation on a held-out split

    def held_out_sigma2(self, stats) -> HeldOutSigma2:
        """The sigma2 of this policy's -ELBO on a held-out split; ``stats`` holds the split's sums (an
        :class:`arelbo.metrics.ELBOAccumulator`; may be None for policies that do not need data)."""
        if stats is None:
            raise ValueError(f"policy {self.name!r} estimates sigma2 from data: an evaluation-set accumulator is needed")
        return HeldOutSigma2(stats.ar_sigma2().clamp_min(self.floor), "isotropic",
                             f"eval-set MLE, isotropic ({self.name})")

    def own_sigma2(self) -> HeldOutSigma2:
        """The policy's own (data-independent) sigma2 as a held-out rule: for given and learned values."""
        was_training = self.training
        self.train(False)  # reading the value must not advance a policy's state (e.g. a first-batch init)
        try:
            with torch.no_grad():
                value = self.sigma2(torch.zeros(1, 1, dtype=torch.float64)).detach().double().cpu()
        finally:
            self.train(was_training)
        return HeldOutSigma2(value, "isotropic", f"policy {self.name} (its own sigma2)")

    def density_sigma2(self, stats) -> HeldOutSigma2:
        """The sigma2 that defines one density p(x) for likelihood estimates (IS-NLL, sampling): the held-out
        rule when it is a density, else the split's isotropic maximum-likelihood value."""
        if self.is_density:
            return self.held_out_sigma2(stats)
        return HeldOutSigma2(stats.ar_sigma2().clamp_min(self.floor), "isotropic",
                             f"eval-set MLE, isotropic (policy {self.name}'s sigma2 defines no single density)")

    # ---- options and display

    @classmethod
    def options(cls) -> dict[str, PolicyOption]:
        """name -> :class:`PolicyOption`, from the constructor's keyword arguments (``floor`` excluded)."""
        return policy_options(cls)

    def extra_repr(self) -> str:
        return f"floor={self.floor:g}"


def policy_options(cls: type[DecoderVariance]) -> dict[str, PolicyOption]:
    """The options of a policy class: its constructor's keyword arguments with their annotated type (else the
    default's type) and default, except ``floor``."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: fall back to the defaults' types
        hints = {}
    out: dict[str, PolicyOption] = {}
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name in ("self", "floor") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = None if p.default is p.empty else p.default
        tp = hints.get(p.name, type(default) if default is not None else Any)
        out[p.name] = PolicyOption(p.name, tp, default)
    return out


def check_number(what: str, value, lo: float = 0.0, lo_inclusive: bool = False, hi: float | None = None) -> float:
    """A finite real in the range, or ValueError "<what> must be > 0, got -1" (the form study specs report too)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    v = float(value) if ok else float("nan")
    if not ok or not math.isfinite(v) or v < lo or (v == lo and not lo_inclusive) or (hi is not None and v >= hi):
        bound = f"{'>=' if lo_inclusive else '>'} {format_number(lo)}" + (f" and < {format_number(hi)}" if hi is not None else "")
        raise ValueError(f"{what} must be {bound}, got {format_number(value) if ok else repr(value)}")
    return v


def format_number(value) -> str:
    """Shortest round-trip text of a float without a trailing '.0' (1.0 -> '1', 1e-05 -> '1e-05')."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


POLICIES: dict[str, type[DecoderVariance]] = {}


def register_policy(cls: type[DecoderVariance]) -> type[DecoderVariance]:
    """Class decorator: make a policy available by its ``name`` in :func:`make_policy` and configs."""
    return register(POLICIES, cls, "policy")


def make_policy(name: str, **kwargs) -> DecoderVariance:
    """Build a registered policy by name; unknown names and arguments are errors that list what is valid."""
    return build(POLICIES, name, kwargs, kind="policy", long_kind="decoder-variance policy", plural="policies")
