"""Feature networks for FID/KID: a registry of image -> feature-vector modules.

``get_feature_net(name) -> (module, info)``. The module maps images of shape (B, C, H, W), float in [0, 1]
(uint8 in [0, 255] is accepted too), to (B, F) float32 features and carries ``num_features`` (what torchmetrics'
FID reads); ``info`` records what a score computed with it depends on: name, weights sha256, feature dim,
expected input and preprocessing.

- ``mnist-features``: a small CNN classifier trained by this project on the MNIST training split
  (``arelbo features train``); its committed weights live in ``arelbo/weights/mnist_features.pt`` with their
  provenance in ``mnist_features.json``. The FID feature is the 128-d ReLU layer before the logits. Features are
  dataset-specific: FIDs computed with it are comparable within this project only, and only on 1x28x28 images.
- ``inception``: the standard FID InceptionV3 (torchmetrics / torch-fidelity weights
  ``weights-inception-2015-12-05-6726825d.pth``), for users who have the weights. Offline and without the
  weights it fails at once with :class:`FeatureNetUnavailable`, saying how to supply them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

MNIST_WEIGHTS = "mnist_features.pt"
MNIST_PROVENANCE = "mnist_features.json"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # input standardisation inside the network (fixed, not learned)

INCEPTION_ENV = "ARELBO_INCEPTION_WEIGHTS"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_DOWNLOAD_TIMEOUT_S = 15.0


class FeatureNetError(ValueError):
    """Bad input to a feature network, or an unknown / inconsistent feature network."""


class FeatureNetUnavailable(FeatureNetError):
    """The feature network's weights cannot be had here (offline, optional dependency missing)."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_weights_dir() -> Path:
    """``arelbo/weights`` inside the installed package (package data, not a Python package)."""
    return Path(__file__).resolve().parent.parent / "weights"


# ------------------------------------------------------------------------------------------------- MNIST CNN

class MnistClassifier(nn.Module):
    """3 conv blocks (32-64-128 channels, BatchNorm, ReLU, 2x2 max-pool) -> FC 128 (the FID feature) -> 10 logits.

    ``features(x)`` / ``forward(x)`` give the (B, 128) features, ``logits(x)`` the class scores. Input: float in
    [0, 1], shape (B, 1, 28, 28); standardised inside with fixed MNIST mean/std. ~240k parameters (~1 MB fp32).
    """

    num_features = 128
    input_shape = (1, 28, 28)

    def __init__(self, feature_dim: int = 128, num_classes: int = 10, dropout: float = 0.25):
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                                 nn.ReLU(inplace=True), nn.MaxPool2d(2))

        self.num_features = feature_dim
        self.conv = nn.Sequential(block(1, 32), block(32, 64), block(64, 128))  # 28 -> 14 -> 7 -> 3
        self.fc = nn.Linear(128 * 3 * 3, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        x = (x - MNIST_MEAN) / MNIST_STD
        return torch.relu(self.fc(self.conv(x).flatten(1)))

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)

    def for_inference(self) -> "MnistClassifier":
        """An eval-mode copy with each BatchNorm folded into its convolution, in channels-last memory format.

        The same function up to float rounding (features agree to ~1e-5); about 3x faster on CPU, where the
        1-channel first convolution and the batch norms dominated FID's featurisation (10,000 images: 3.0 s -> 0.9 s
        on 2 cores).
        """
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        net = copy.deepcopy(self).eval()
        for block in net.conv:
            block[0] = fuse_conv_bn_eval(block[0], block[1])
            block[1] = nn.Identity()
        return net.to(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------- the FID extractor module

def check_images(x: Tensor, input_shape: tuple[int, int, int] | None, net_name: str) -> Tensor:
    """Validate a batch of images and return it as float32 in [0, 1], shape (B, C, H, W).

    uint8 -> /255; float: must be finite, values on the 0..1 scale (clamped to [0, 1]; a maximum above 1.5 means
    the caller passed 0..255 floats, which is an error). (B, H, W) is read as one channel.
    """
    if not isinstance(x, Tensor):
        raise FeatureNetError(f"{net_name}: expected a torch.Tensor batch of images, got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise FeatureNetError(f"{net_name}: expected images of shape (B, C, H, W), got {tuple(x.shape)}")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        c, h, w = input_shape
        raise FeatureNetError(
            f"{net_name} takes {c}x{h}x{w} images, got {tuple(x.shape[1:])}. FID features are dataset-specific: "
            f"this network was trained on MNIST and its scores mean nothing for other data; use a feature network "
            f"for your dataset (or 'inception' with its weights)")
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if not x.is_floating_point():
        raise FeatureNetError(f"{net_name}: expected uint8 or float images, got {x.dtype}")
    x = x.float()
    if x.numel() and not torch.isfinite(x).all():
        raise FeatureNetError(f"{net_name}: images contain NaN or infinite values")
    if x.numel() and x.max() > 1.5:
        raise FeatureNetError(f"{net_name}: float images must be in [0, 1] (max is {float(x.max()):.3g}); "
                              f"pass uint8 pixels or divide by 255")
    return x.clamp(0.0, 1.0)


class FeatureExtractor(nn.Module):
    """(B, C, H, W) images (float in [0, 1] or uint8) -> (B, F) float32 features, input validated.

    ``num_features`` is what torchmetrics' ``FrechetInceptionDistance(feature=module)`` reads for its state size.
    Always in eval mode.
    """

    def __init__(self, net: nn.Module, num_features: int, name: str,
                 input_shape: tuple[int, int, int] | None, to_net: Callable[[Tensor], Tensor] | None = None):
        super().__init__()
        self.net = net
        self.num_features = int(num_features)
        self.name = name
        self.input_shape = input_shape
        self.to_net = to_net
        self.net.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FeatureExtractor":  # never leaves eval mode
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        x = check_images(x, self.input_shape, self.name)
        param = next(self.net.parameters(), None)
        if param is not None:
            x = x.to(param.device)
        if self.to_net is not None:
            x = self.to_net(x)
        return self.net(x).float().reshape(x.shape[0], -1)


# ------------------------------------------------------------------------------------------------ loaders

def read_provenance(weights_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    path = Path(weights_dir or default_weights_dir()) / MNIST_PROVENANCE
    if not path.is_file():
        raise FileNotFoundError(f"no provenance file {path}; train the network with `arelbo features train`")
    return json.loads(path.read_text())


def load_mnist_features(weights: str | os.PathLike | None = None, verify: bool = True) -> tuple[nn.Module, dict]:
    path = Path(weights) if weights else default_weights_dir() / MNIST_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no mnist-features weights at {path}; make them with `arelbo features train`")
    sha = sha256_file(path)
    provenance: dict[str, Any] = {}
    prov_path = path.with_suffix(".json")
    if prov_path.is_file():
        provenance = json.loads(prov_path.read_text())
        if verify and provenance.get("sha256") not in (None, sha):
            raise FeatureNetError(f"{path} has sha256 {sha} but {prov_path} records {provenance['sha256']}: "
                                  f"the weights were changed without their provenance; retrain or restore them")
    state = torch.load(path, map_location="cpu", weights_only=True)
    arch = provenance.get("architecture", {})
    net = MnistClassifier(feature_dim=int(arch.get("feature_dim", 128)))
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise FeatureNetError(f"{path} does not hold MnistClassifier weights: {e}") from e
    module = FeatureExtractor(net.for_inference(), net.num_features, "mnist-features", MnistClassifier.input_shape,
                              to_net=_channels_last)
    info = {
        "name": "mnist-features",
        "weights_sha256": sha,
        "weights_file": path.name,
        "feature_dim": net.num_features,
        "feature_layer": "fc (128-d, after ReLU), before the classifier head",
        "input": "1x28x28, float in [0,1] (uint8 /255); other sizes are refused",
        "preprocessing": f"(x - {MNIST_MEAN}) / {MNIST_STD} inside the network",
        "test_accuracy": provenance.get("test_accuracy"),
        "inference": "batch norms folded into the convolutions, channels-last (features as the trained net's to ~1e-5)",
    }
    return module, info


def _channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _inception_error(reason: str) -> FeatureNetUnavailable:
    return FeatureNetUnavailable(
        f"the 'inception' feature network is not available: {reason}. To use it: `pip install arelbo[inception]` "
        f"(installs torch-fidelity) and supply the standard FID Inception weights file {INCEPTION_FILE} "
        f"(from {INCEPTION_URL}) with the environment variable {INCEPTION_ENV}=/path/to/{INCEPTION_FILE} or "
        f"get_feature_net('inception', weights=FILE) in Python, or put it in "
        f"{Path(torch.hub.get_dir()) / 'checkpoints'}. Offline, use "
        f"'mnist-features' for MNIST (a project-specific FID, not comparable to published Inception FIDs)")


def load_inception(weights: str | os.PathLike | None = None, allow_download: bool = True) -> tuple[nn.Module, dict]:
    """The torchmetrics FID InceptionV3 (2048-d pool features). Raises FeatureNetUnavailable at once when
    torch-fidelity is missing; downloads (with a short timeout) only when no weights file is given or cached."""
    import importlib.util

    if importlib.util.find_spec("torch_fidelity") is None:  # checked before anything touches the network
        raise _inception_error("torch-fidelity is not installed")
    weights = weights or os.environ.get(INCEPTION_ENV) or None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise _inception_error(f"weights file {path} does not exist")
    elif cached.is_file():
        path = cached
    elif not allow_download:
        raise _inception_error("no weights file given and none cached, and downloading is disabled")
    else:
        path = None
    from torchmetrics.image.fid import NoTrainInceptionV3

    import socket

    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(INCEPTION_DOWNLOAD_TIMEOUT_S)
    try:
        inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                       feature_extractor_weights_path=None if path is None else str(path))
    except Exception as e:  # network errors, timeouts, a corrupt file: one clear error
        raise _inception_error(f"loading the weights failed ({type(e).__name__}: {e})") from e
    finally:
        socket.setdefaulttimeout(old_timeout)
    path = path or cached
    sha = sha256_file(path) if path.is_file() else None

    def to_uint8(x: Tensor) -> Tensor:  # torch-fidelity's Inception takes uint8 RGB; grey is repeated to 3 channels
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise FeatureNetError(f"inception takes 1- or 3-channel images, got {x.shape[1]} channels")
        return (x * 255).round().to(torch.uint8)

    module = FeatureExtractor(inception, 2048, "inception", None, to_net=to_uint8)
    info = {
        "name": "inception",
        "weights_sha256": sha,
        "weights_file": INCEPTION_FILE,
        "feature_dim": 2048,
        "feature_layer": "pool3 (2048-d)",
        "input": "any size, 1 or 3 channels, float in [0,1] (uint8 /255)",
        "preprocessing": "grey repeated to RGB, x*255 rounded to uint8, bilinear (antialiased) resize to 299x299, "
                         "(x-128)/128 (torchmetrics NoTrainInceptionV3)",
    }
    return module, info


FEATURE_NETS: dict[str, Callable[..., tuple[nn.Module, dict]]] = {
    "mnist-features": load_mnist_features,
    "inception": load_inception,
}

_LOADED: dict[tuple, tuple[nn.Module, dict]] = {}


def get_feature_net(name: str = "mnist-features", weights: str | os.PathLike | None = None,
                    **options: Any) -> tuple[nn.Module, dict]:
    """(module, info) for a registered feature network; loaded once per process (per name and weights file)."""
    if name not in FEATURE_NETS:
        raise FeatureNetError(f"unknown feature network {name!r}; choose from {sorted(FEATURE_NETS)}")
    if name == "inception":
        weights = weights or os.environ.get(INCEPTION_ENV) or None
    key = (name, None if weights is None else str(Path(weights).resolve()), tuple(sorted(options.items())))
    if key not in _LOADED:
        _LOADED[key] = FEATURE_NETS[name](weights, **options)
    module, info = _LOADED[key]
    return module, dict(info)


# ------------------------------------------------------------------------------------------------- training

@torch.inference_mode()
def accuracy(net: MnistClassifier, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    was_training = net.training
    net.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = check_images(images[i:i + batch_size], MnistClassifier.input_shape, "mnist-features")
        correct += int((net.logits(x).argmax(1) == labels[i:i + batch_size]).sum())
    net.train(was_training)
    return correct / max(len(images), 1)


def train_mnist_features(epochs: int = 4, seed: int = 0, batch_size: int = 128, lr: float = 2e-3,
                         weight_decay: float = 1e-4, splits=None, log: Callable[[str], None] = print
                         ) -> tuple[MnistClassifier, dict[str, Any]]:
    """Train the MNIST feature classifier on the 55k training split; seeded and deterministic.

    Recipe: Adam, one-cycle schedule (peak ``lr``), batch 128, no augmentation. Returns the trained net (eval mode)
    and a report (val/test accuracy, time).
    """
    if splits is None:  # the core loads no dataset: the caller passes MNIST (arelbo.data.load_dataset("mnist"))
        raise ValueError("train_mnist_features needs splits=arelbo.data.load_dataset('mnist') (or another copy)")
    torch.manual_seed(seed)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        net = MnistClassifier()
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        x_train, y_train = splits.train, splits.train_labels
        steps_per_epoch = (len(x_train) + batch_size - 1) // batch_size
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch)
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        history = []
        for epoch in range(epochs):
            net.train()
            perm = torch.randperm(len(x_train), generator=gen)
            total, n = 0.0, 0
            for i in range(0, len(x_train), batch_size):
                idx = perm[i:i + batch_size]
                x = x_train[idx].float().div_(255.0)
                loss = nn.functional.cross_entropy(net.logits(x), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
                n += len(idx)
            val_acc = accuracy(net, splits.val, splits.val_labels)
            history.append({"epoch": epoch + 1, "train_loss": total / n, "val_accuracy": val_acc})
            log(f"epoch {epoch + 1}/{epochs}: train loss {total / n:.4f}, val accuracy {val_acc:.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
        train_time = time.perf_counter() - t0
        net.eval()
        test_acc = accuracy(net, splits.test, splits.test_labels)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    report = {
        "epochs": epochs, "seed": seed, "batch_size": batch_size, "optimizer": "AdamW",
        "lr": lr, "weight_decay": weight_decay, "schedule": "OneCycleLR", "augmentation": "none",
        "val_accuracy": history[-1]["val_accuracy"] if history else None, "test_accuracy": test_acc,
        "train_seconds": round(train_time, 1), "history": history,
    }
    return net, report
