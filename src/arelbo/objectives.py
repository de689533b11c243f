"""The Gaussian-VAE loss and its decoder-variance policies (pure PyTorch).

A Gaussian VAE's negative ELBO per sample, with D observed elements and decoder variance sigma2, is

    -ELBO = sum_d (x_d - f_d(z))^2 / (2 sigma2_d) + 1/2 sum_d log(2 pi sigma2_d) + KL(q(z|x) || p(z)).

The rate KL is in closed form for p(z) = N(0, I); for a learnable prior (:mod:`arelbo.models.priors`) the caller
passes its Monte-Carlo estimate as ``rate``, and every policy below works unchanged.

Everything that distinguishes the methods compared in this project is *how sigma2 is chosen*. That choice is
a :class:`DecoderVariance` policy; adding one is one small class and one ``@register_policy`` line.

AR-ELBO (``"ar"``) sets sigma2 to its batch maximum-likelihood value S / D inside the step. We write its loss
in the equivalent *detached-MLE* form

    loss = mean_b ||x_b - f(z_b)||^2 / (2 sg(sigma2)) + (D/2) log(2 pi sg(sigma2)) + mean_b KL_b

whose gradient equals that of (D/2) log S + KL (envelope theorem) and whose value equals the exact -ELBO at
sigma2 = S / D. That form is the one that survives data parallelism: the sums that make sigma2 are all-reduced
across ranks (detached) and DDP's gradient averaging then gives the single-process full-batch gradient.

Usage in any loop::

    loss_fn = GaussianVAELoss("ar")
    out = loss_fn(x, x_hat, mu, logvar)   # LossOutput: loss, distortion, rate, kl_per_dim, sigma2, neg_elbo, ...
    out.loss.backward()

Under torch.distributed the ``ar*`` policies all-reduce their sums over the default process group. A call made
on only some ranks (rank-0 validation) must opt out, or it waits for the other ranks for ever:
``GaussianVAELoss("ar", all_reduce=False)`` (or ``loss_fn.all_reduce = False``), or name the ranks that take
part with ``process_group=``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from arelbo.registry import build, register

__all__ = [
    "LossOutput",
    "NonFiniteError",
    "DecoderVariance",
    "HeldOutSigma2",
    "PolicyOption",
    "policy_options",
    "DEFAULT_POLICY",
    "GaussianVAELoss",
    "POLICIES",
    "register_policy",
    "make_policy",
    "gaussian_kl",
    "neg_elbo_per_sample",
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
    sigma2: Tensor  # the decoder variance used, detached: shape (), (D,) or (B,)
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


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """Elementwise KL(N(mu, exp(logvar)) || N(0, 1)), shape (B, q)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0)


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


def _check_float(**tensors: Tensor) -> None:
    """Integer inputs would be silently read on their own scale (uint8 pixels give sigma2 ~ 1e4)."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(
                f"{name} has dtype {t.dtype}: the loss needs floating-point tensors (convert uint8 pixels to "
                "[0, 1] first, e.g. x.float() / 255 or arelbo.data.to_float)"
            )


def _upcast(t: Tensor) -> Tensor:
    """At least float32 (half/bfloat16 inputs are computed in float32); float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _reduces(group=None, enabled: bool = True) -> bool:
    """Whether statistics are all-reduced: enabled, under torch.distributed, and more than one rank in ``group``."""
    return enabled and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _global_sums(*tensors: Tensor, group=None, enabled: bool = True) -> list[Tensor]:
    """All-reduce (sum) detached statistics across the ranks of ``group`` when running under torch.distributed."""
    if not _reduces(group, enabled):
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
    or None for one value per example), ``kind`` ("isotropic", "diagonal" or "per-sample") and ``source`` (a
    description for reports)."""

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
    (``ValueError``). Display and study specs (``arelbo compare --policies``): ``label`` names the policy in
    tables. A spec is ``NAME[:ARGS]``, ARGS comma-separated items: a bare number sets ``spec_option`` (required
    when ``spec_required``), a bare word of ``spec_flags`` sets the options it maps to (in the same slot as the
    number), ``KEY=VALUE`` sets option ``spec_keys[KEY]``; ``spec_aliases`` maps short names to full specs.
    :meth:`spec_label` names a parsed spec; ``spec_what``/``spec_example`` phrase errors, ``spec_form`` the help.
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # display name (default: the name)
    is_density: ClassVar[bool] = True
    stationary: ClassVar[bool] = True  # False: the objective changes from call to call (running state)
    sigma2_kind: ClassVar[str] = "estimated"  # "estimated" from the data (ar-type), "given" or "learned"
    min_batch: ClassVar[int] = 1  # the smallest training batch (global) its sigma2 is defined on
    spec_option: ClassVar[Optional[str]] = None
    spec_required: ClassVar[bool] = False
    spec_flags: ClassVar[dict] = {}  # e.g. {"mle": {"init_mle": True}}
    spec_keys: ClassVar[dict] = {}  # e.g. {"lr": "log_sigma2_lr"}
    spec_aliases: ClassVar[dict] = {}  # e.g. {"learned-fair": "learned:mle,lr=0.01"}
    spec_format: ClassVar[str] = ""  # the label with the spec's number, e.g. "fixed σ²={}"
    spec_what: ClassVar[str] = ""  # e.g. "sigma2" in "fixed needs its sigma2, e.g. fixed:0.1"
    spec_example: ClassVar[str] = "1"
    spec_form: ClassVar[str] = ""  # how help texts show the spec, e.g. "fixed:S (S > 0)" (default from the above)
    kl_weight: float = 1.0
    # Where the ar* policies all-reduce their statistics (set through GaussianVAELoss): the process group
    # (None: the default group) and whether to all-reduce at all.
    process_group = None
    all_reduce: bool = True

    def _sums(self, *tensors: Tensor) -> list[Tensor]:
        return _global_sums(*tensors, group=self.process_group, enabled=self.all_reduce)

    def __init__(self, floor: float = 1e-6):
        super().__init__()
        if not floor > 0:
            raise ValueError(f"sigma2 floor must be > 0, got {floor}")
        self.floor = float(floor)

    def sigma2(self, sq_err: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, sq_err: Tensor, rate: Tensor, sigma2: Tensor) -> Tensor:
        return neg_elbo_per_sample(sq_err, sigma2, self.kl_weight * rate).mean()

    def optimizer_options(self) -> dict:
        """Optimiser options (e.g. ``{"lr": 1e-2}``) for this policy's own parameters; {}: the trainer's."""
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

    @classmethod
    def spec_label(cls, first: str | None = None, keyed: dict[str, str] | None = None) -> str:
        """The label of a study spec: ``first`` the text of its number or flag, ``keyed`` its KEY=VALUE items."""
        label = cls.label or cls.name
        if first is not None:
            label = (cls.spec_format or f"{label} {cls.spec_option}={{}}").format(first)
        if keyed:
            label += " (" + ", ".join(f"{k} {v}" for k, v in keyed.items()) + ")"
        return label

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


def _check_number(what: str, value, lo: float = 0.0, lo_inclusive: bool = False, hi: float | None = None) -> float:
    """A finite real in the range, or ValueError "<what> must be > 0, got -1" (the form study specs report too)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    v = float(value) if ok else float("nan")
    if not ok or not math.isfinite(v) or v < lo or (v == lo and not lo_inclusive) or (hi is not None and v >= hi):
        bound = f"{'>=' if lo_inclusive else '>'} {_num(lo)}" + (f" and < {_num(hi)}" if hi is not None else "")
        raise ValueError(f"{what} must be {bound}, got {_num(value) if ok else repr(value)}")
    return v


def _num(value) -> str:
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


@register_policy
class Fixed(DecoderVariance):
    """sigma2 given and constant (sigma2 = 1 is the classic VAE). No floor: the user chose the value."""

    name = "fixed"
    label = "fixed σ²"
    sigma2_kind = "given"
    spec_option, spec_required, spec_format, spec_what, spec_example = "sigma2", True, "fixed σ²={}", "sigma2", "0.1"
    spec_form = "fixed:S (S > 0)"

    def __init__(self, sigma2: float = 1.0, floor: float = 1e-6):
        super().__init__(floor)
        sigma2 = _check_number("fixed sigma2", sigma2)
        self.register_buffer("value", torch.tensor(float(sigma2)), persistent=False)
        self.sigma2_value = float(sigma2)  # exact: the float32 buffer would round it for float64 losses

    def sigma2(self, sq_err: Tensor) -> Tensor:
        return torch.full((), self.sigma2_value, dtype=sq_err.dtype, device=sq_err.device)

    def held_out_sigma2(self, stats) -> HeldOutSigma2:
        return self.own_sigma2()

    def extra_repr(self) -> str:
        return f"sigma2={self.value.item():g}"


@register_policy
class Beta(Fixed):
    """beta-VAE: loss = mean_b(||x_b - x^_b||^2 + beta KL_b) on plain squared error.

    This is the fixed-sigma2 loss at sigma2 = beta / 2 scaled by beta (same optimum, different step scale);
    the reported -ELBO is the exact one at sigma2 = beta / 2.
    """

    name = "beta"
    label = "β-VAE"
    spec_option, spec_required, spec_format, spec_what, spec_example = "beta", True, "β-VAE β={}", "value", "4"
    spec_form = "beta:B (B > 0)"

    def __init__(self, beta: float = 1.0, floor: float = 1e-6):
        beta = _check_number("beta", beta)
        super().__init__(sigma2=beta / 2.0, floor=floor)
        self.beta = float(beta)

    def loss(self, sq_err: Tensor, rate: Tensor, sigma2: Tensor) -> Tensor:
        return (sq_err.sum(1) + self.beta * rate).mean()

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}"


class _FloorUp(torch.autograd.Function):
    """max(s, floor) whose gradient below the floor still flows when it points upwards (descent raises s).

    The value is the clamp's; above the floor the gradient is the identity's. Below it, a gradient that would
    raise s passes unchanged and one that would lower it further is dropped, so the parameter neither sticks at
    the floor (clamp_min's zero gradient) nor drifts away below it.
    """

    @staticmethod
    def forward(ctx, s: Tensor, floor: float) -> Tensor:
        below = s < floor
        ctx.save_for_backward(below)
        return torch.where(below, torch.full_like(s, floor), s)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (below,) = ctx.saved_tensors
        return torch.where(below & (grad > 0), torch.zeros_like(grad), grad), None


@register_policy
class Learned(DecoderVariance):
    """log sigma2 an ``nn.Parameter`` trained by gradient with the rest (Dai & Wipf's gamma; sigma-VAE).

    Put the loss's parameters in the optimiser: ``Adam([*model.parameters(), *loss_fn.parameters()])``; a trainer
    should give them the options of :meth:`optimizer_options` (their own learning rate).

    Two options make it a fair baseline against AR-ELBO, whose sigma2 sits at the batch MLE from the first step:
    with Adam, log sigma2 moves by about ``lr`` per step, so from 1 at lr 1e-3 it needs thousands of steps to
    reach MLE-sized values; ``log_sigma2_lr`` gives it its own learning rate, and ``init_mle`` sets it on the
    first training call to the batch MLE S / D (all-reduced; ``init_sigma2`` is then unused). Whether that
    happened is a buffer in the state_dict, so a resumed run does not re-initialise.
    """

    name = "learned"
    label = "learned σ²"
    sigma2_kind = "learned"
    spec_option, spec_what, spec_form = "init_sigma2", "initial value", "learned[:S0|mle][,lr=X]"
    spec_flags = {"mle": {"init_mle": True}}
    spec_keys = {"lr": "log_sigma2_lr"}
    spec_aliases = {"learned-fair": "learned:mle,lr=0.01"}  # the fair baseline: starts where AR-ELBO starts

    def __init__(self, init_sigma2: float = 1.0, floor: float = 1e-6, init_mle: bool = False,
                 log_sigma2_lr: float | None = None):
        super().__init__(floor)
        init_sigma2 = _check_number("initial sigma2", init_sigma2)
        if log_sigma2_lr is not None:
            log_sigma2_lr = _check_number("log_sigma2_lr: the log sigma2 learning rate", log_sigma2_lr)
        self.log_sigma2 = nn.Parameter(torch.tensor(math.log(init_sigma2)))
        self.init_mle = bool(init_mle)
        self.log_sigma2_lr = None if log_sigma2_lr is None else float(log_sigma2_lr)
        if self.init_mle:  # only then: state_dicts of plain learned runs keep their keys
            self.register_buffer("initialised", torch.tensor(False))
            # A Python copy of the flag, so that steps after the first read no tensor (no host sync); None: not
            # known yet (read the buffer once), as after construction or after a state_dict is loaded.
            self._initialised_known: bool | None = None
            self.register_load_state_dict_post_hook(_forget_initialised)

    def optimizer_options(self) -> dict:
        return {} if self.log_sigma2_lr is None else {"lr": self.log_sigma2_lr}

    @classmethod
    def spec_label(cls, first: str | None = None, keyed: dict[str, str] | None = None) -> str:
        parts = [] if first is None else ["MLE init" if first == "mle" else f"init {first}"]
        parts += [f"{k} {v}" for k, v in (keyed or {}).items()]
        return cls.label + (" (" + ", ".join(parts) + ")" if parts else "")

    def sigma2(self, sq_err: Tensor) -> Tensor:
        if self.init_mle and self.training and not self._is_initialised():
            total, count = self._sums(sq_err.detach().sum(), sq_err.new_tensor(float(sq_err.numel())))
            with torch.no_grad():
                self.log_sigma2.copy_((total / count).clamp_min(self.floor).log().to(self.log_sigma2.dtype))
                self.initialised.fill_(True)
            self._initialised_known = True
        # A floor through a smooth max would bias the optimum; floor only where it binds, and keep the gradient
        # that lifts sigma2 back above the floor (a plain clamp_min would leave it stuck there for ever).
        return _FloorUp.apply(self.log_sigma2.exp(), self.floor).to(sq_err.dtype)

    def _is_initialised(self) -> bool:
        if self._initialised_known is None:
            self._initialised_known = bool(self.initialised)  # one read after construction or a load
        return self._initialised_known

    def held_out_sigma2(self, stats) -> HeldOutSigma2:
        return self.own_sigma2()

    def extra_repr(self) -> str:
        lr = "" if self.log_sigma2_lr is None else f", log_sigma2_lr={self.log_sigma2_lr:g}"
        return f"floor={self.floor:g}, init_mle={self.init_mle}{lr}"


def _forget_initialised(module: "Learned", incompatible_keys) -> None:
    """After a state_dict is loaded, the buffer decides again whether the MLE initialisation has happened."""
    module._initialised_known = None


@register_policy
class AR(DecoderVariance):
    """AR-ELBO, isotropic: sigma2 = (batch mean of ||x - x^||^2) / D, detached, all-reduced under DDP."""

    name = "ar"
    label = "AR-ELBO"

    def sigma2(self, sq_err: Tensor) -> Tensor:
        total, count = self._sums(sq_err.detach().sum(), sq_err.new_tensor(float(sq_err.numel())))
        return (total / count).clamp_min(self.floor).to(sq_err.dtype)

    def mle_sigma2(self, sq_err: Tensor) -> Tensor:
        return sq_err.mean()


@register_policy
class ARDiagonal(DecoderVariance):
    """One sigma2 per observed element, shared across data: sigma2_d = batch mean of (x_d - x^_d)^2."""

    name = "ar-diagonal"
    label = "AR-ELBO diagonal"
    min_batch = 2

    def sigma2(self, sq_err: Tensor) -> Tensor:
        if sq_err.shape[0] < 2 and not _reduces(self.process_group, self.all_reduce):
            raise ValueError(
                f"ar-diagonal needs at least 2 samples per batch, got {sq_err.shape[0]}: with one sample each "
                "sigma2_d is that sample's own squared error and the -ELBO is degenerate; use a larger batch, "
                "or the ar / ar-per-sample policy"
            )
        total, count = self._sums(sq_err.detach().sum(0), sq_err.new_tensor(float(sq_err.shape[0])))
        return (total / count).clamp_min(self.floor).to(sq_err.dtype)

    def mle_sigma2(self, sq_err: Tensor) -> Tensor:
        return sq_err.mean(0)

    def held_out_sigma2(self, stats) -> HeldOutSigma2:
        if stats is None:
            return super().held_out_sigma2(stats)
        return HeldOutSigma2(stats.ar_sigma2(diagonal=True).clamp_min(self.floor), "diagonal",
                             f"eval-set MLE, diagonal ({self.name})")


@register_policy
class ARPerSample(DecoderVariance):
    """One isotropic sigma2 per data point: sigma2(x) = ||x - x^||^2 / D (local to each sample: no all-reduce).

    A per-example sigma2 defines no single density p(x): likelihood estimates use the isotropic MLE instead."""

    name = "ar-per-sample"
    label = "AR-ELBO per-sample"
    is_density = False

    def sigma2(self, sq_err: Tensor) -> Tensor:
        return sq_err.detach().mean(1, keepdim=True).clamp_min(self.floor)

    def mle_sigma2(self, sq_err: Tensor) -> Tensor:
        return sq_err.mean(1, keepdim=True)

    def held_out_sigma2(self, stats) -> HeldOutSigma2:
        if stats is None:
            return super().held_out_sigma2(stats)
        if self.floor != stats.per_sample_floor:
            raise ValueError(f"per-sample floor {self.floor} differs from the accumulator's {stats.per_sample_floor}")
        return HeldOutSigma2(None, "per-sample", f"eval-set MLE per example ({self.name})")


@register_policy
class AREMA(DecoderVariance):
    """sigma2 from an exponential moving average of the batch MLE (kept in state_dict, so it resumes).

    In training mode each call updates the average with the (all-reduced) batch MLE and uses the updated value;
    the first call initialises it. In eval mode the stored value is used unchanged. On a held-out split its
    -ELBO uses the split's isotropic MLE, like ``ar``.
    """

    name = "ar-ema"
    label = "AR-ELBO EMA"
    stationary = False
    spec_option, spec_format, spec_form = "momentum", "AR-ELBO EMA m={}", "ar-ema[:M] (0 <= M < 1)"

    def __init__(self, momentum: float = 0.99, floor: float = 1e-6):
        super().__init__(floor)
        self.momentum = _check_number("momentum", momentum, lo=0.0, lo_inclusive=True, hi=1.0)
        self.register_buffer("running_sigma2", torch.tensor(1.0))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))

    def sigma2(self, sq_err: Tensor) -> Tensor:
        if self.training:
            total, count = self._sums(sq_err.detach().sum(), sq_err.new_tensor(float(sq_err.numel())))
            batch = (total / count).to(self.running_sigma2.dtype)
            with torch.no_grad():  # torch.where, not a Python branch on the count: no host sync per step
                updated = self.running_sigma2 * self.momentum + (1 - self.momentum) * batch
                self.running_sigma2.copy_(torch.where(self.num_updates == 0, batch, updated))
                self.num_updates.add_(1)
        return self.running_sigma2.clamp_min(self.floor).to(sq_err.dtype)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum:g}, floor={self.floor:g}"


@register_policy
class ARAnnealed(DecoderVariance):
    """AR-ELBO with a floor on sigma2 that decays from ``anneal_from`` to ``floor`` over ``anneal_steps`` steps.

    sigma2 = max(batch MLE, floor_t) with log floor_t = log anneal_from + min(t / anneal_steps, 1) (log floor -
    log anneal_from): log-linear, so every decade takes the same number of steps. Early on the floor binds and the
    loss is the fixed-sigma2 VAE at floor_t (a slow descent like a learned sigma2 from 1); once the MLE is above
    the floor it is AR-ELBO. t counts training calls; it is a buffer in the state_dict, so a run resumes exactly.
    In eval mode t does not advance.
    """

    name = "ar-annealed"
    label = "AR-ELBO annealed"
    stationary = False
    spec_option, spec_what, spec_format = "anneal_steps", "the annealing steps", "AR-ELBO annealed over {} steps"
    spec_form = "ar-annealed[:N] (N >= 1 steps)"

    def __init__(self, anneal_steps: int = 10000, anneal_from: float = 1.0, floor: float = 1e-6):
        super().__init__(floor)
        if isinstance(anneal_steps, bool) or not isinstance(anneal_steps, int) or anneal_steps < 1:
            raise ValueError(f"anneal_steps must be an integer >= 1, got {anneal_steps!r}")
        if not (math.isfinite(anneal_from) and anneal_from >= self.floor):
            raise ValueError(f"anneal_from must be >= the floor {self.floor:g}, got {anneal_from!r}")
        self.anneal_steps, self.anneal_from = int(anneal_steps), float(anneal_from)
        self.register_buffer("num_steps", torch.tensor(0, dtype=torch.long))

    def current_floor(self, step: int | None = None) -> float:
        """floor_t at step t (default: the current step count)."""
        t = int(self.num_steps) if step is None else int(step)
        frac = min(max(t, 0) / self.anneal_steps, 1.0)
        return math.exp(math.log(self.anneal_from) + frac * (math.log(self.floor) - math.log(self.anneal_from)))

    def sigma2(self, sq_err: Tensor) -> Tensor:
        # floor_t computed on the device from the step buffer (float64): reading the count would sync every step
        frac = (self.num_steps.double() / self.anneal_steps).clamp(0.0, 1.0)
        log_from = math.log(self.anneal_from)
        floor_t = torch.exp(log_from + frac * (math.log(self.floor) - log_from))
        if self.training:
            self.num_steps.add_(1)
        total, count = self._sums(sq_err.detach().sum(), sq_err.new_tensor(float(sq_err.numel())))
        return (total / count).clamp_min(floor_t).to(sq_err.dtype)

    def extra_repr(self) -> str:
        return f"anneal_steps={self.anneal_steps}, anneal_from={self.anneal_from:g}, floor={self.floor:g}"


# --------------------------------------------------------------------------------------------------------------
# The loss


class GaussianVAELoss(nn.Module):
    """Negative ELBO of a Gaussian VAE with a pluggable decoder-variance policy.

    Args:
        policy: a registered name (``"ar"`` default, ``"fixed"``, ``"beta"``, ``"learned"``, ``"ar-diagonal"``,
            ``"ar-per-sample"``, ``"ar-ema"``, ``"ar-annealed"``) or a :class:`DecoderVariance` instance.
        sigma2_floor: numerical floor on sigma2 (near-perfect reconstruction would send log sigma2 to -inf).
        check_finite: what to do when the loss comes out NaN or inf (a NaN/inf anywhere in x, x_hat, mu or
            logvar makes it so). ``"auto"`` (default): raise :class:`NonFiniteError`, naming the input at fault,
            at once for CPU tensors (no sync needed); on an accelerator, where reading a device value stalls the
            step, the check is deferred to the first host read of the output (``out.scalars()`` or
            ``out.check_finite()``). ``True``: always check at once (one device sync per call on accelerators).
            ``False``: never check (loops that already guard the loss).
        process_group: the ranks whose statistics the ``ar*`` policies all-reduce (None: the default group).
        all_reduce: False keeps sigma2 local to this process even under torch.distributed: needed when only some
            ranks call the loss (rank-0 validation), which otherwise waits for the others for ever.
        **policy_kwargs: the policy's own arguments, e.g. ``sigma2=0.1`` for ``"fixed"``.

    Inputs must be floating point (uint8 pixels: divide by 255 first) with a batch of at least one sample.
    """

    def __init__(
        self,
        policy: str | DecoderVariance = "ar",
        sigma2_floor: float = 1e-6,
        check_finite: bool | str = "auto",
        process_group=None,
        all_reduce: bool = True,
        **policy_kwargs,
    ):
        super().__init__()
        if isinstance(policy, DecoderVariance):
            if policy_kwargs:
                raise ValueError("pass policy arguments to the policy's constructor, not with a policy instance")
            self.policy = policy
        else:
            self.policy = make_policy(policy, floor=sigma2_floor, **policy_kwargs)
        if not (isinstance(check_finite, bool) or check_finite == "auto"):
            raise ValueError(f"check_finite must be 'auto', True or False, got {check_finite!r}")
        self.check_finite = check_finite
        self.process_group = process_group
        self.all_reduce = all_reduce

    @property
    def process_group(self):
        return self.policy.process_group

    @process_group.setter
    def process_group(self, group) -> None:
        self.policy.process_group = group

    @property
    def all_reduce(self) -> bool:
        return self.policy.all_reduce

    @all_reduce.setter
    def all_reduce(self, enabled: bool) -> None:
        self.policy.all_reduce = bool(enabled)

    @property
    def policy_name(self) -> str:
        return self.policy.name

    def forward(self, x: Tensor, x_hat: Tensor, mu: Tensor, logvar: Tensor, rate: Tensor | None = None) -> LossOutput:
        """x and x_hat of the same shape (B, ...), floating point; mu and logvar of shape (B, q).

        ``rate``: a precomputed (B,) KL(q(z|x) || p(z)) for a prior other than N(0, I) (e.g. the Monte-Carlo
        estimate of :meth:`arelbo.models.VAE.rate`); None (default): the closed-form KL to N(0, I).
        """
        if x.shape != x_hat.shape:
            raise ValueError(f"x and reconstruction differ in shape: x {tuple(x.shape)} vs x_hat {tuple(x_hat.shape)}")
        if x.dim() < 2:
            raise ValueError(f"x must be batched (B, ...), got shape {tuple(x.shape)}")
        _check_float(x=x, x_hat=x_hat)
        diff = _upcast(x.flatten(1)) - _upcast(x_hat.flatten(1))
        out = self._compute(diff * diff, mu, logvar, rate)
        given = {} if rate is None else {"rate": rate}
        return self._checked(out, x=x, x_hat=x_hat, mu=mu, logvar=logvar, **given)

    def from_sq_err(self, sq_err: Tensor, mu: Tensor, logvar: Tensor, rate: Tensor | None = None) -> LossOutput:
        """The loss from elementwise squared errors (B, D), e.g. an exact expectation E_q (x_d - f_d(z))^2;
        ``rate`` as in :meth:`forward`."""
        out = self._compute(sq_err, mu, logvar, rate)
        given = {} if rate is None else {"rate": rate}
        return self._checked(out, sq_err=sq_err, mu=mu, logvar=logvar, **given)

    def _compute(self, sq_err: Tensor, mu: Tensor, logvar: Tensor, rate: Tensor | None) -> LossOutput:
        if sq_err.dim() != 2:
            raise ValueError(f"sq_err must have shape (B, D), got {tuple(sq_err.shape)}")
        if sq_err.shape[0] == 0:
            raise ValueError("empty batch (B = 0): the loss is a mean over the batch and needs at least one sample")
        if mu.shape != logvar.shape or mu.dim() != 2 or mu.shape[0] != sq_err.shape[0]:
            raise ValueError(
                f"mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} must both be (B, q) with "
                f"B = {sq_err.shape[0]} matching x"
            )
        _check_float(sq_err=sq_err, mu=mu, logvar=logvar)
        if rate is None:
            kl = gaussian_kl(_upcast(mu), _upcast(logvar))
            rate = kl.sum(1)
            kl_per_dim = kl.mean(0)
        else:
            if rate.shape != (sq_err.shape[0],):
                raise ValueError(f"rate must have shape (B,) = ({sq_err.shape[0]},), got {tuple(rate.shape)}")
            _check_float(rate=rate)
            rate = _upcast(rate)
            kl_per_dim = torch.full((mu.shape[1],), float("nan"), dtype=rate.dtype, device=rate.device)
        sigma2 = self.policy.sigma2(sq_err)
        loss = self.policy.loss(sq_err, rate, sigma2)
        with torch.no_grad():
            neg_elbo = neg_elbo_per_sample(sq_err.detach(), sigma2.detach(), rate.detach()).mean()
        num_elements = sq_err.shape[1]
        return LossOutput(
            loss=loss,
            distortion=sq_err.sum(1),
            rate=rate,
            kl_per_dim=kl_per_dim,
            sigma2=sigma2.detach().squeeze(-1) if sigma2.dim() == 2 else sigma2.detach(),
            neg_elbo=neg_elbo,
            bits_per_dim=neg_elbo / (num_elements * math.log(2.0)),
            num_elements=num_elements,
        )

    def _checked(self, out: LossOutput, **inputs: Tensor) -> LossOutput:
        """Check the loss scalar (NaN/inf in any input reaches it): one cheap test instead of one per input."""
        mode = self.check_finite
        if mode is False:
            return out
        finite = torch.isfinite(out.loss.detach())
        if mode == "auto" and finite.device.type != "cpu":  # reading it now would stall the device: defer
            return dataclasses.replace(out, pending_check=finite)
        if not bool(finite):
            for name, t in inputs.items():
                if not bool(torch.isfinite(t).all()):
                    what = "encoder output (mu or logvar)" if name in ("mu", "logvar") else name
                    raise NonFiniteError(f"{what} contains NaN or inf ({name} {tuple(t.shape)}): the loss would be NaN")
            raise NonFiniteError(
                f"the {self.policy.name!r} loss is {out.loss.item()} with finite inputs: sigma2 or the squared "
                "error overflowed (rescale the data to about [0, 1])"
            )
        return out

    def extra_repr(self) -> str:
        return f"policy={self.policy.name!r}"

