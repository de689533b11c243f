"""FID/KID on the committed MNIST feature network: real data, real weights, no mocks.

Reference throughout: the 10,000 MNIST test images (featurised once per session, then served from the
in-memory cache; the accuracy test reuses those features). Scored sets are small (1,000-5,000 images) to keep the
default run short; the slow tests give the protocol's numbers (10,000 train vs 10,000 test, and 55k vs 10k).
Scale (measured): train(5k) vs test FID ~2, blur sigma 0.5 ~40, sigma 2 ~900, uniform noise ~2000.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from arelbo.metrics import fid as fidmod
from arelbo.metrics.features import (FEATURE_NETS, INCEPTION_ENV, FeatureNetError, FeatureNetUnavailable,
                                     MnistClassifier, accuracy, default_weights_dir, get_feature_net,
                                     load_inception, train_mnist_features)
from arelbo.metrics.fid import compute_fid, featurize

WEIGHTS = default_weights_dir() / "mnist_features.pt"
PROVENANCE = default_weights_dir() / "mnist_features.json"
N_SET = 1000


@pytest.fixture(scope="module")
def mnist():
    from arelbo.data import load_dataset

    return load_dataset("mnist")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Disk cache in a temporary folder: tests never write to the user's ~/.cache."""
    monkeypatch.setenv("ARELBO_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "arelbo-cache"))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """uint8 (N, 1, H, W) -> float in [0, 1], blurred by a separable Gaussian conv2d kernel (zero padding)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k1 = torch.exp(-0.5 * (t / sigma) ** 2)
    k1 = k1 / k1.sum()
    kernel = (k1[:, None] * k1[None, :])[None, None]
    return F.conv2d(x.float() / 255.0, kernel, padding=radius).clamp(0, 1)


def fid(images, mnist, **kw):
    return compute_fid(images, mnist.test, reference_name="mnist:test", **kw)


# ------------------------------------------------------------------------------------------- the weights

def test_committed_weights_load_and_match_provenance():
    assert WEIGHTS.is_file() and PROVENANCE.is_file()
    assert WEIGHTS.stat().st_size < 5_000_000
    prov = json.loads(PROVENANCE.read_text())
    assert prov["sha256"] == hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    for field in ("command", "seed", "data", "test_accuracy", "torch_version"):
        assert field in prov, field
    assert prov["command"].startswith("arelbo features train")
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    net = MnistClassifier()
    net.load_state_dict(state)  # strict: exactly this architecture
    module, info = get_feature_net("mnist-features")
    assert info["weights_sha256"] == prov["sha256"] and info["feature_dim"] == module.num_features == 128
    assert set(FEATURE_NETS) >= {"mnist-features", "inception"}


def test_folded_channels_last_features_equal_the_trained_nets(mnist):
    """FID runs the net with its batch norms folded into the convolutions, channels-last (3x faster on CPU): the
    features must be the trained net's (eval mode, unfolded) up to float rounding, and so must the FID."""
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    net = MnistClassifier()
    net.load_state_dict(state)
    net.eval()
    module, info = get_feature_net("mnist-features")
    assert "folded" in info["inference"]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())
    x = mnist.test[:2000]
    with torch.inference_mode():
        plain = net.features(x.float() / 255)
    folded = featurize(x, module)
    assert folded.shape == plain.shape
    assert (folded - plain).abs().max() <= 1e-4 * plain.abs().max()
    fid_plain = fidmod.fid_from_features(plain, fidmod.featurize(mnist.test[5000:7000], module))
    fid_folded = fidmod.fid_from_features(folded, fidmod.featurize(mnist.test[5000:7000], module))
    assert abs(fid_plain - fid_folded) < 1e-3


def test_feature_net_test_accuracy_at_least_99_percent(mnist):
    """Full 10k test set; the logits come from the very features FID uses (head applied to them, eval mode)."""
    module, _ = get_feature_net("mnist-features")
    feats, _, _ = fidmod.reference_features(mnist.test, "mnist-features", reference_name="mnist:test")
    with torch.inference_mode():
        acc = float((module.net.head(feats).argmax(1) == mnist.test_labels).double().mean())
    print(f"mnist-features test accuracy: {acc:.4f}")
    assert acc >= 0.99
    assert abs(acc - json.loads(PROVENANCE.read_text())["test_accuracy"]) < 1e-9  # the recorded number is real


def test_training_is_seeded_and_deterministic(mnist):
    small = SimpleNamespace(train=mnist.train[:256], train_labels=mnist.train_labels[:256],
                            val=mnist.val[:100], val_labels=mnist.val_labels[:100],
                            test=mnist.test[:100], test_labels=mnist.test_labels[:100])
    runs = [train_mnist_features(epochs=1, seed=3, batch_size=128, splits=small, log=lambda m: None)
            for _ in range(2)]
    (a, ra), (b, rb) = runs
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert ra["test_accuracy"] == rb["test_accuracy"]
    assert ra["test_accuracy"] == accuracy(a, small.test, small.test_labels)


# ------------------------------------------------------------------------------------------------ FID values

def test_fid_of_a_set_with_itself_is_zero(mnist):
    x = mnist.test[:N_SET]
    r = compute_fid(x, x, reference_name="mnist:test[:2000]")
    assert abs(r["fid"]) < 1e-3, r["fid"]


def test_fid_train_vs_test_is_small_and_protocol_recorded(mnist):
    r = fid(mnist.train[:5000], mnist)
    print(f"MNIST train(5k) vs test(10k) FID: {r['fid']:.4f}")
    assert 0 < r["fid"] < 5.0  # vs ~40 for the mildest blur below
    p = r["protocol"]
    assert p["feature_net"] == "mnist-features" and len(p["weights_sha256"]) == 64 and p["feature_dim"] == 128
    assert p["n_generated"] == 5000 and p["n_reference"] == 10_000
    assert p["reference"] == {"name": "mnist:test", "count": 10_000}
    assert p["seed"] == 0 and "8-bit" in p["preprocessing"] and p["torchmetrics"]


def test_fid_noise_and_blur_are_large_and_ordered(mnist):
    x = mnist.train[:N_SET]
    clean = fid(x, mnist)["fid"]
    blurred = [fid(gaussian_blur(x, s), mnist)["fid"] for s in (0.5, 1.0, 2.0)]
    noise = fid(torch.rand(N_SET, 1, 28, 28, generator=torch.Generator().manual_seed(0)), mnist)["fid"]
    print(f"FID vs mnist:test ({N_SET} train images): clean {clean:.3f}, blur sigma 0.5/1/2 "
          f"{blurred[0]:.3f}/{blurred[1]:.3f}/{blurred[2]:.3f}, uniform noise {noise:.1f}")
    assert clean < blurred[0] < blurred[1] < blurred[2] < noise
    assert blurred[0] > 2 * clean and blurred[2] > 20 * clean and noise > 100 * clean


def test_kid_with_protocol(mnist):
    x = mnist.train[:N_SET]
    r = fid(x, mnist, kid=True, kid_subset_size=300, kid_subsets=10)
    blurred = fid(gaussian_blur(x, 1.0), mnist, kid=True, kid_subset_size=300, kid_subsets=10)
    print(f"KID vs mnist:test ({N_SET} train images): clean {r['kid_mean']:.4f} +- {r['kid_std']:.4f}, "
          f"blur sigma 1 {blurred['kid_mean']:.3f} +- {blurred['kid_std']:.3f}")
    assert 0 <= r["kid_std"] and blurred["kid_mean"] > 20 * max(abs(r["kid_mean"]), r["kid_std"])
    assert r["protocol"]["kid"]["subset_size"] == 300 and r["protocol"]["kid"]["subsets"] == 10
    again = fid(x, mnist, kid=True, kid_subset_size=300, kid_subsets=10)
    assert again["kid_mean"] == r["kid_mean"]  # subsets drawn with the recorded seed


def test_input_forms_agree(mnist):
    """uint8 tensor, float tensor in [0, 1], and an iterable of (images, labels) batches give one FID."""
    x = mnist.train[:500]
    a = fid(x, mnist)["fid"]
    b = fid(x.float() / 255.0, mnist)["fid"]
    c = fid([(x[i:i + 150], None) for i in range(0, 500, 150)], mnist)["fid"]
    assert a == pytest.approx(b, abs=1e-9) and a == pytest.approx(c, rel=1e-6)


def test_reference_cache_memory_then_disk(mnist, monkeypatch, tmp_path):
    monkeypatch.setenv("ARELBO_CACHE_DIR", str(tmp_path))
    x = mnist.train[:300]
    ref = mnist.test[:500]
    fidmod.clear_reference_cache()
    first = compute_fid(x, ref, reference_name="mnist:test[:500]")
    second = compute_fid(x, ref, reference_name="mnist:test[:500]")
    assert (first["reference_cache"], second["reference_cache"]) == ("computed", "memory")
    assert list(tmp_path.rglob("*.npz"))
    fidmod.clear_reference_cache()
    third = compute_fid(x, ref, reference_name="mnist:test[:500]")
    assert third["reference_cache"] == "disk" and third["fid"] == first["fid"] == second["fid"]
    other = compute_fid(x, mnist.test[500:1000], reference_name="mnist:test[:500]")  # same name, other images
    assert other["reference_cache"] == "computed"  # the content hash keeps them apart


def test_featurize_shape(mnist):
    feats = featurize(mnist.val[:300], "mnist-features", batch_size=128)
    assert feats.shape == (300, 128) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    assert torch.equal(feats, featurize(mnist.val[:300], "mnist-features", batch_size=300))  # batching-invariant


# -------------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("bad, match", [
    (torch.rand(10, 3, 28, 28), "dataset-specific"),
    (torch.rand(10, 1, 32, 32), "1x28x28"),
    (torch.full((10, 1, 28, 28), float("nan")), "NaN"),
    (torch.rand(10, 1, 28, 28) * 255, r"\[0, 1\]"),
    (torch.zeros(10, 1, 28, 28, dtype=torch.int32), "uint8 or float"),
    (torch.rand(10, 784), "shape"),
    ("not images", "tensor"),
])
def test_bad_input_errors_clearly(bad, match, mnist):
    with pytest.raises(FeatureNetError, match=match):
        compute_fid(bad, mnist.test[:100], reference_name="mnist:test[:100]")


def test_bad_arguments(mnist):
    with pytest.raises(FeatureNetError, match="unknown feature network"):
        get_feature_net("vgg")
    with pytest.raises(ValueError, match="at least 2"):
        compute_fid(mnist.train[:1], mnist.test[:100])
    with pytest.raises(ValueError, match="kid_subset_size"):
        compute_fid(mnist.train[:100], mnist.test[:100], kid=True, kid_subset_size=500)


def test_inception_offline_fails_fast_with_instructions(monkeypatch, tmp_path):
    """No torch-fidelity here (and the weights path points nowhere): a clear error at once, no network."""
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "missing.pth"))
    t0 = time.perf_counter()
    with pytest.raises(FeatureNetUnavailable) as err:
        get_feature_net("inception")
    assert time.perf_counter() - t0 < 5
    msg = str(err.value)
    assert INCEPTION_ENV in msg and "arelbo[inception]" in msg and "weights-inception-2015-12-05" in msg
    with pytest.raises(FeatureNetUnavailable):
        load_inception(allow_download=False)
    with pytest.raises(FeatureNetUnavailable):
        compute_fid(torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28), feature_net="inception")


# ---------------------------------------------------------------------------------------------------- slow

@pytest.mark.slow
def test_fid_train_10k_vs_test_10k(mnist):
    """The protocol's default sizes: 10,000 scored images against the 10,000 test images."""
    t0 = time.perf_counter()
    feats = featurize(mnist.train[:10_000], "mnist-features")
    print(f"featurised 10000 images in {time.perf_counter() - t0:.2f} s")
    r = fid(mnist.train[:10_000], mnist, kid=True)
    print(f"MNIST train(10k) vs test(10k) FID: {r['fid']:.4f}, KID {r['kid_mean']:.4f} +- {r['kid_std']:.4f}")
    assert feats.shape == (10_000, 128)
    assert 0 < r["fid"] < 3.0 and r["protocol"]["n_generated"] == r["protocol"]["n_reference"] == 10_000


@pytest.mark.slow
def test_fid_full_train_split_vs_test(mnist):
    """All 55k training images against the 10k test images."""
    r = fid(mnist.train, mnist)
    print(f"MNIST train(55k) vs test(10k) FID: {r['fid']:.4f}")
    assert 0 < r["fid"] < 3.0
