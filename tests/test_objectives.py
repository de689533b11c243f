"""GaussianVAELoss and its decoder-variance policies: values by hand, gradients against independent formulas,
state, floors and input errors. Everything in float64 so that equalities hold to ~1e-15."""

import dataclasses
import math

import pytest
import torch

from arelbo.objectives import POLICIES, GaussianVAELoss, NonFiniteError, make_policy

pytestmark = pytest.mark.usefixtures("single_thread")

LN2 = math.log(2.0)
LOG_2PI = math.log(2 * math.pi)
F64 = torch.float64

# A 2-sample x 3-element x 2-latent example whose every number is written out below.
X = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 1.5]], dtype=F64)
X_HAT = torch.tensor([[0.0, 2.5, 1.0], [0.5, 0.0, 0.5]], dtype=F64)
MU = torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=F64)
LOGVAR = torch.tensor([[0.0, LN2], [-LN2, 0.0]], dtype=F64)
# squared errors: [[1, 0.25, 1], [0, 1, 1]] -> distortion [2.25, 2.0], batch mean S = 2.125, D = 3
# KL_bj = (mu^2 + s - log s - 1) / 2: [[0, 1 - ln2/2], [1.75 + ln2/2, 0.5]] -> rate [1 - ln2/2, 2.25 + ln2/2], mean 1.625
DISTORTION = [2.25, 2.0]
RATE = [1 - LN2 / 2, 2.25 + LN2 / 2]
KL_PER_DIM = [0.875 + LN2 / 4, 0.75 - LN2 / 4]

HAND = {
    # policy, kwargs: (-ELBO, loss, sigma2)
    # sigma2 = 0.5: mean(sq / 1) + 3/2 log(2 pi 0.5) + 1.625
    ("fixed", (("sigma2", 0.5),)): (3.75 + 1.5 * math.log(math.pi), None, [0.5]),
    # sigma2 = 1: 2.125 / 2 + 3/2 log 2 pi + 1.625
    ("fixed", ()): (2.6875 + 1.5 * LOG_2PI, None, [1.0]),
    # sigma2 = S / D = 17/24: 3/2 (log(2 pi 17/24) + 1) + 1.625
    ("ar", ()): (1.5 * (math.log(2 * math.pi * 17 / 24) + 1) + 1.625, None, [17 / 24]),
    ("ar-ema", ()): (1.5 * (math.log(2 * math.pi * 17 / 24) + 1) + 1.625, None, [17 / 24]),
    # sigma_d^2 = batch means per element [0.5, 0.625, 1]: sum_d (log(2 pi sigma_d^2) + 1) / 2 + 1.625
    ("ar-diagonal", ()): (3.125 + 1.5 * LOG_2PI + 0.5 * math.log(0.5 * 0.625), None, [0.5, 0.625, 1.0]),
    # sigma_b^2 = [2.25 / 3, 2 / 3]: mean_b 3/2 (log(2 pi sigma_b^2) + 1) + 1.625
    ("ar-per-sample", ()): (3.125 + 1.5 * LOG_2PI + 0.75 * math.log(0.75 * 2 / 3), None, [0.75, 2 / 3]),
    # beta = 2: loss = mean(sq_sum + 2 KL) = mean(4.25 - ln2, 6.5 + ln2) = 5.375; -ELBO at sigma2 = beta / 2 = 1
    ("beta", (("beta", 2.0),)): (2.6875 + 1.5 * LOG_2PI, 5.375, [1.0]),
    # log sigma2 is a float32 parameter: init 1 (log = 0) is exact
    ("learned", (("init_sigma2", 1.0),)): (2.6875 + 1.5 * LOG_2PI, None, [1.0]),
}


@pytest.mark.parametrize("key", list(HAND), ids=lambda k: k[0] + "".join(f"-{a}={v}" for a, v in k[1]))
def test_values_by_hand(key):
    name, kwargs = key
    neg_elbo, loss, sigma2 = HAND[key]
    out = GaussianVAELoss(name, **dict(kwargs)).to(F64)(X, X_HAT, MU, LOGVAR)
    assert out.neg_elbo.dtype == F64 and out.loss.dtype == F64
    torch.testing.assert_close(out.distortion, torch.tensor(DISTORTION, dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(out.rate, torch.tensor(RATE, dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(out.kl_per_dim, torch.tensor(KL_PER_DIM, dtype=F64), rtol=0, atol=1e-15)
    assert out.neg_elbo.item() == pytest.approx(neg_elbo, abs=1e-14)
    assert out.loss.item() == pytest.approx(neg_elbo if loss is None else loss, abs=1e-14)
    assert out.sigma2.reshape(-1).tolist() == pytest.approx(sigma2, abs=1e-15)
    assert out.bits_per_dim.item() == pytest.approx(neg_elbo / (3 * LN2), abs=1e-14)
    assert out.num_elements == 3
    scalars = out.scalars()
    assert scalars["neg_elbo"] == pytest.approx(neg_elbo, rel=1e-6) and set(scalars) >= {"loss", "sigma2", "rate"}


def test_image_shaped_input_flattens():
    x, x_hat = X.view(2, 1, 3, 1), X_HAT.view(2, 1, 3, 1)
    out = GaussianVAELoss("ar")(x, x_hat, MU, LOGVAR)
    assert out.neg_elbo.item() == pytest.approx(HAND[("ar", ())][0], abs=1e-14)


def test_fixed_sigma2_is_exact_in_float64():
    out = GaussianVAELoss("fixed", sigma2=0.1)(X, X_HAT, MU, LOGVAR)
    assert out.sigma2.item() == 0.1  # not 0.10000000149 (the float32 rounding)


def test_ar_diagonal_when_batch_size_equals_dim():
    x = torch.arange(9, dtype=F64).view(3, 3)
    out = GaussianVAELoss("ar-diagonal")(x, 0.5 * x, torch.zeros(3, 2, dtype=F64), torch.zeros(3, 2, dtype=F64))
    expected = (0.5 * x).pow(2).mean(0)
    torch.testing.assert_close(out.sigma2, expected)
    assert out.neg_elbo.item() == pytest.approx(0.5 * (3 * LOG_2PI + 3 + expected.log().sum().item()), abs=1e-13)


# ---------------------------------------------------------------------------------------------- gradients


def _leaves(seed=0, b=5, d=6, q=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=F64)
    x_hat = torch.randn(b, d, generator=g, dtype=F64).requires_grad_(True)
    mu = torch.randn(b, q, generator=g, dtype=F64).requires_grad_(True)
    logvar = (0.3 * torch.randn(b, q, generator=g, dtype=F64)).requires_grad_(True)
    return x, x_hat, mu, logvar


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def _kl(mu, logvar):
    return 0.5 * (mu**2 + logvar.exp() - logvar - 1).sum(1).mean()


@pytest.mark.parametrize(
    "name, reference",
    [
        # (D/2) log S + KL, S = batch mean of ||x - x^||^2
        ("ar", lambda sq, d: 0.5 * d * torch.log(sq.sum(1).mean())),
        # 1/2 sum_d log sigma_d^2 with sigma_d^2 = batch mean of (x_d - x^_d)^2 (not detached)
        ("ar-diagonal", lambda sq, d: 0.5 * torch.log(sq.mean(0)).sum()),
        # mean_b (D/2) log ||x_b - x^_b||^2
        ("ar-per-sample", lambda sq, d: (0.5 * d * torch.log(sq.sum(1))).mean()),
    ],
)
def test_ar_gradients_equal_the_profile_objective(name, reference):
    x, x_hat, mu, logvar = _leaves()
    d = x.shape[1]
    got = _grads(GaussianVAELoss(name)(x, x_hat, mu, logvar).loss, (x_hat, mu, logvar))
    want = _grads(reference((x - x_hat) ** 2, d) + _kl(mu, logvar), (x_hat, mu, logvar))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_ar_gradient_equals_fixed_at_detached_batch_mle():
    x, x_hat, mu, logvar = _leaves(seed=1)
    got = _grads(GaussianVAELoss("ar")(x, x_hat, mu, logvar).loss, (x_hat, mu, logvar))
    s2 = ((x - x_hat.detach()) ** 2).mean().item()
    fixed = _grads(GaussianVAELoss("fixed", sigma2=s2)(x, x_hat, mu, logvar).loss, (x_hat, mu, logvar))
    for a, b in zip(got, fixed):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_learned_sigma2_gradient_points_to_the_mle():
    x, x_hat, mu, logvar = _leaves(seed=2)
    x_hat = x_hat.detach()
    d = x.shape[1]
    s_mean = ((x - x_hat) ** 2).sum(1).mean().item()  # S
    mle = s_mean / d
    for init in (4 * mle, mle / 4, mle):
        loss_fn = GaussianVAELoss("learned").to(F64)
        with torch.no_grad():  # set log sigma2 in float64 (the constructor's float32 would round it)
            loss_fn.policy.log_sigma2.fill_(math.log(init))
        out = loss_fn(x, x_hat, mu, logvar)
        (g,) = torch.autograd.grad(out.loss, loss_fn.policy.log_sigma2)
        # d/d log sigma2 of [S / (2 sigma2) + (D/2) log sigma2] = D/2 - S / (2 sigma2)
        assert g.item() == pytest.approx(d / 2 - s_mean / (2 * init), abs=1e-12)
        if init == mle:
            assert abs(g.item()) < 1e-12
        else:
            assert math.copysign(1, g.item()) == math.copysign(1, init - mle)  # descent moves toward the MLE
    loss_fn = GaussianVAELoss("learned", init_sigma2=10 * mle).to(F64)
    opt = torch.optim.SGD(loss_fn.parameters(), lr=0.3)
    for _ in range(60):
        opt.zero_grad()
        loss_fn(x, x_hat, mu.detach(), logvar.detach()).loss.backward()
        opt.step()
    assert loss_fn.policy.log_sigma2.exp().item() == pytest.approx(mle, rel=1e-9)


# ---------------------------------------------------------------------------------------------- state, floor


def _batch(scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 5, generator=g, dtype=F64)
    return x, x + scale * torch.randn(4, 5, generator=g, dtype=F64), torch.zeros(4, 2, dtype=F64), torch.zeros(4, 2, dtype=F64)


def test_ar_ema_running_value_state_dict_and_eval():
    b1, b2, b3 = _batch(1.0, 0), _batch(0.5, 1), _batch(2.0, 2)
    mle = [((x - xh) ** 2).mean().item() for x, xh, _, _ in (b1, b2, b3)]
    loss_fn = GaussianVAELoss("ar-ema", momentum=0.9).to(F64)
    assert loss_fn(*b1).sigma2.item() == pytest.approx(mle[0], rel=1e-15)  # the first call initialises
    expected = 0.9 * mle[0] + 0.1 * mle[1]
    assert loss_fn(*b2).sigma2.item() == pytest.approx(expected, rel=1e-15)
    state = loss_fn.state_dict()
    assert set(state) == {"policy.running_sigma2", "policy.num_updates"} and state["policy.num_updates"].item() == 2

    resumed = GaussianVAELoss("ar-ema", momentum=0.9).to(F64)
    resumed.load_state_dict(state)
    expected = 0.9 * expected + 0.1 * mle[2]
    assert resumed(*b3).sigma2.item() == pytest.approx(expected, rel=1e-15)
    assert loss_fn(*b3).sigma2.item() == pytest.approx(expected, rel=1e-15)

    resumed.eval()
    out = resumed(*b1)  # eval: uses the stored value, does not update it
    assert out.sigma2.item() == pytest.approx(expected, rel=1e-15)
    assert resumed.policy.running_sigma2.item() == pytest.approx(expected, rel=1e-15)
    assert resumed.policy.num_updates.item() == 3


@pytest.mark.parametrize("name", ["ar", "ar-diagonal", "ar-per-sample", "ar-ema"])
def test_floor_binds_on_perfect_reconstruction(name):
    x = torch.randn(4, 5, dtype=F64)
    zeros = torch.zeros(4, 2, dtype=F64)
    for floor in (1e-6, 1e-3):
        out = GaussianVAELoss(name, sigma2_floor=floor).to(F64)(x, x.clone(), zeros, zeros)
        assert torch.all(out.sigma2 == floor)
        assert math.isfinite(out.loss.item())
        assert out.neg_elbo.item() == pytest.approx(0.5 * 5 * (LOG_2PI + math.log(floor)), rel=1e-12)


def test_learned_floor_binds():
    x = torch.randn(4, 5, dtype=F64)
    zeros = torch.zeros(4, 2, dtype=F64)
    out = GaussianVAELoss("learned", init_sigma2=1e-9, sigma2_floor=1e-4)(x, x + 1e-3, zeros, zeros)
    assert out.sigma2.item() == pytest.approx(1e-4, rel=1e-6)


def test_learned_below_its_floor_keeps_the_gradient_that_lifts_it():
    """clamp_min gave zero gradient below the floor, so a learned sigma2 that fell under it stayed there."""
    x = torch.randn(4, 5, dtype=F64)
    zeros = torch.zeros(4, 2, dtype=F64)
    mle = 1e-2  # the data's sq err per element: well above the floor
    x_hat = x + 0.1 * torch.tensor([1.0, -1.0]).repeat(10)[:20].reshape(4, 5).to(F64)
    loss_fn = GaussianVAELoss("learned", sigma2_floor=1e-4).to(F64)
    with torch.no_grad():
        loss_fn.policy.log_sigma2.fill_(math.log(1e-6))  # below the floor
    out = loss_fn(x, x_hat, zeros, zeros)
    assert out.sigma2.item() == pytest.approx(1e-4, rel=1e-12)  # the value is the floor's
    (g,) = torch.autograd.grad(out.loss, loss_fn.policy.log_sigma2)
    # the gradient at the floored value, times d sigma2 / d log sigma2 of the unfloored one
    assert g.item() == pytest.approx((5 / 2 - 5 * mle / (2 * 1e-4)) * 1e-6 / 1e-4, rel=1e-9) and g.item() < 0
    opt = torch.optim.Adam(loss_fn.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        loss_fn(x, x_hat, zeros, zeros).loss.backward()
        opt.step()
    assert loss_fn.policy.log_sigma2.exp().item() == pytest.approx(mle, rel=2e-2)  # climbed back to the MLE
    # an optimum below the floor: the gradient that would push further down is dropped (no drift)
    loss_fn = GaussianVAELoss("learned", sigma2_floor=1.0).to(F64)
    with torch.no_grad():
        loss_fn.policy.log_sigma2.fill_(math.log(0.5))
    (g,) = torch.autograd.grad(loss_fn(x, x_hat, zeros, zeros).loss, loss_fn.policy.log_sigma2)
    assert g.item() == 0.0


def test_half_precision_is_computed_in_float32_and_float64_stays():
    zeros = torch.zeros(2, 2)
    assert GaussianVAELoss("ar")(X.half(), X_HAT.half(), zeros.half(), zeros.half()).loss.dtype == torch.float32
    assert GaussianVAELoss("ar")(X, X_HAT, MU, LOGVAR).loss.dtype == F64


# ---------------------------------------------------------------------------------------------- errors


def test_shape_errors():
    loss_fn = GaussianVAELoss("ar")
    with pytest.raises(ValueError, match="differ in shape"):
        loss_fn(X, X_HAT[:, :2], MU, LOGVAR)
    with pytest.raises(ValueError, match="batched"):
        loss_fn(X[0], X_HAT[0], MU, LOGVAR)
    with pytest.raises(ValueError, match="must both be"):
        loss_fn(X, X_HAT, MU, LOGVAR[:, :1])
    with pytest.raises(ValueError, match="B = 2"):
        loss_fn(X, X_HAT, MU[:1], LOGVAR[:1])
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        loss_fn.from_sq_err(torch.ones(2, 3, 1), MU, LOGVAR)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs(bad):
    loss_fn = GaussianVAELoss("ar")
    x = X.clone()
    x[1, 2] = bad
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        loss_fn(x, X_HAT, MU, LOGVAR)
    mu = MU.clone()
    mu[0, 0] = bad
    with pytest.raises(ValueError, match="mu or logvar"):
        loss_fn(X, X_HAT, mu, LOGVAR)
    assert math.isnan(GaussianVAELoss("ar", check_finite=False)(x, X_HAT, MU, LOGVAR).neg_elbo.item())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_reconstruction_is_named(bad):
    x_hat = X_HAT.clone()
    x_hat[0, 1] = bad
    with pytest.raises(ValueError, match=r"x_hat contains NaN or inf \(x_hat \(2, 3\)\)"):
        GaussianVAELoss("ar")(X, x_hat, MU, LOGVAR)
    with pytest.raises(ValueError, match="sq_err contains NaN or inf"):
        GaussianVAELoss("fixed").from_sq_err((X - x_hat) ** 2, MU, LOGVAR)


def test_finite_check_reads_one_scalar_not_the_inputs():
    """The protection costs no pass over the inputs (nor, on an accelerator, a sync per call): only the loss
    scalar is tested; the inputs are looked at only to name the culprit once it failed."""
    from torch.overrides import TorchFunctionMode

    sizes = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.isfinite:
                sizes.append(args[0].numel())
            return func(*args, **(kwargs or {}))

    with Spy():
        out = GaussianVAELoss("ar")(X, X_HAT, MU, LOGVAR)
    assert sizes == [1] and out.pending_check is None
    # where the check is deferred (accelerators), the first host read raises
    deferred = dataclasses.replace(out, loss=torch.tensor(float("nan")), pending_check=torch.tensor(False))
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        deferred.scalars()
    with pytest.raises(ValueError, match="check_finite must be"):
        GaussianVAELoss("ar", check_finite="sometimes")


def test_integer_inputs_are_refused():
    x = (X.abs() * 100).to(torch.uint8)
    with pytest.raises(ValueError, match=r"x has dtype torch.uint8: the loss needs floating-point .* / 255"):
        GaussianVAELoss("ar")(x, X_HAT, MU, LOGVAR)
    with pytest.raises(ValueError, match="x_hat has dtype torch.int64"):
        GaussianVAELoss("ar")(X, X_HAT.long(), MU, LOGVAR)
    with pytest.raises(ValueError, match="mu has dtype torch.int64"):
        GaussianVAELoss("ar")(X, X_HAT, MU.long(), LOGVAR)


def test_empty_batch_is_refused():
    empty = torch.zeros(0, 3, dtype=F64)
    for name in POLICIES:
        with pytest.raises(ValueError, match=r"empty batch \(B = 0\)"):
            GaussianVAELoss(name)(empty, empty, empty[:, :2], empty[:, :2])


def test_ar_diagonal_needs_two_samples():
    with pytest.raises(ValueError, match="ar-diagonal needs at least 2 samples per batch, got 1"):
        GaussianVAELoss("ar-diagonal")(X[:1], X_HAT[:1], MU[:1], LOGVAR[:1])
    assert math.isfinite(GaussianVAELoss("ar-diagonal")(X, X_HAT, MU, LOGVAR).loss.item())
    for name in ("ar", "ar-per-sample"):  # one sample is a well-posed batch for these
        assert math.isfinite(GaussianVAELoss(name)(X[:1], X_HAT[:1], MU[:1], LOGVAR[:1]).loss.item())


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "1"])
def test_fixed_sigma2_must_be_positive_finite(bad):
    with pytest.raises(ValueError, match="fixed sigma2 must be > 0"):
        GaussianVAELoss("fixed", sigma2=bad)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="beta must be"):
        GaussianVAELoss("beta", beta=0.0)
    with pytest.raises(ValueError, match="momentum"):
        GaussianVAELoss("ar-ema", momentum=1.0)
    with pytest.raises(ValueError, match="initial sigma2 must be > 0"):
        GaussianVAELoss("learned", init_sigma2=-1.0)
    with pytest.raises(ValueError, match="floor must be > 0"):
        GaussianVAELoss("ar", sigma2_floor=0.0)
    with pytest.raises(ValueError, match="not with a policy instance"):
        GaussianVAELoss(make_policy("fixed", sigma2=2.0), sigma2=3.0)
    assert GaussianVAELoss(make_policy("fixed", sigma2=2.0)).policy_name == "fixed"


def test_unknown_policy_lists_known_ones():
    with pytest.raises(ValueError, match="unknown decoder-variance policy 'nope'") as err:
        GaussianVAELoss("nope")
    for name in ("ar", "ar-diagonal", "ar-ema", "ar-per-sample", "beta", "fixed", "learned"):
        assert name in str(err.value)
    assert set(POLICIES) >= {"ar", "ar-diagonal", "ar-ema", "ar-per-sample", "beta", "fixed", "learned"}


def test_unknown_policy_kwargs():
    with pytest.raises(ValueError, match=r"policy 'ar' takes no argument\(s\) \['sigma2'\]; valid: \['floor'\]"):
        GaussianVAELoss("ar", sigma2=0.1)
    with pytest.raises(ValueError, match="momentum"):
        GaussianVAELoss("fixed", momentum=0.5)
