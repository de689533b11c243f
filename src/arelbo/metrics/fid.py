"""FID and KID with a recorded protocol, on torchmetrics' ``FrechetInceptionDistance`` /
``KernelInceptionDistance`` with a pluggable feature network (see :mod:`arelbo.metrics.features`).

Each image set is featurised once, in batches under ``torch.inference_mode``; the (N, F) features are then fed
to the torchmetrics metrics through a pass-through feature module, so FID and KID share one featurisation and the
reference features can be cached (in memory per process, and on disk under ``$ARELBO_CACHE_DIR`` or
``~/.cache/arelbo``). Statistics are float64 (torchmetrics keeps its FID sums in float64; the features are cast
to float64 before they reach it, so the score comes back in float64 too).

Typical use::

    from arelbo.data import reference_images
    result = compute_fid(samples, reference_images("mnist:test"), reference_name="mnist:test")
    result["fid"], result["protocol"]             # samples: (N, 1, 28, 28) float in [0, 1] or uint8

(This module, like the rest of the core, loads no dataset itself: the reference images are passed in.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .features import FeatureNetError, check_images, get_feature_net

QUANTIZE_NOTE = "float images clamped to [0,1] and rounded to 8-bit levels (as if saved as PNG); uint8 / 255"
_REFERENCE_CACHE: dict[tuple, Tensor] = {}  # key -> float32 (N, F) reference features


class _Precomputed(nn.Module):
    """Pass-through 'feature extractor' for torchmetrics: the batch already is a (B, F) feature matrix."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"expected ({self.num_features})-d feature rows, got {tuple(features.shape)}")
        return features.double()


# ------------------------------------------------------------------------------------------- featurising

def _batches(images: Tensor | Iterable, batch_size: int) -> Iterator[Tensor]:
    if isinstance(images, Tensor):
        if images.dim() < 3:
            raise FeatureNetError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
        for i in range(0, images.shape[0], batch_size):
            yield images[i:i + batch_size]
        return
    if isinstance(images, (str, bytes)) or not isinstance(images, Iterable):
        raise FeatureNetError(f"expected a tensor of images or an iterable of batches, got {type(images).__name__}")
    for batch in images:
        if isinstance(batch, (tuple, list)):  # (images, labels) from a DataLoader
            batch = batch[0]
        if not isinstance(batch, Tensor):
            raise FeatureNetError(f"expected batches of image tensors, got {type(batch).__name__}")
        for i in range(0, max(batch.shape[0], 1), batch_size):
            yield batch[i:i + batch_size]


def featurize(images: Tensor | Iterable, feature_net: str | nn.Module = "mnist-features", batch_size: int = 500,
              quantize: bool = True, progress: bool = False, desc: str = "features") -> Tensor:
    """(N, F) float32 features of a tensor of images or an iterable of batches, under ``torch.inference_mode``.

    Inputs: uint8 in [0, 255] or float in [0, 1] (clamped; NaN/inf refused), shape (N, C, H, W) or (N, H, W).
    With ``quantize``, float images are rounded to 8-bit levels first, like the uint8 reference data.
    """
    module = get_feature_net(feature_net)[0] if isinstance(feature_net, str) else feature_net
    name = getattr(module, "name", type(module).__name__)
    shape = getattr(module, "input_shape", None)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    out = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=desc, unit="img", total=images.shape[0] if isinstance(images, Tensor) else None)
    with torch.inference_mode():
        for batch in _batches(images, batch_size):
            if batch.shape[0] == 0:
                continue
            x = check_images(batch, shape, name)
            if quantize and batch.is_floating_point():
                x = x.mul(255.0).round_().div_(255.0)
            out.append(module(x).float().cpu())
            if bar is not None:
                bar.update(batch.shape[0])
    if bar is not None:
        bar.close()
    if not out:
        raise FeatureNetError("no images were given")
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------ caching

def cache_dir() -> Path:
    return Path(os.environ.get("ARELBO_CACHE_DIR") or Path.home() / ".cache" / "arelbo")


def _content_hash(x: Tensor) -> str:
    return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _cache_file(key: tuple) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(str(k) for k in key))[:150]
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
    return cache_dir() / "fid-reference" / f"{slug}-{digest}.npz"


def _load_disk(key: tuple, feature_dim: int) -> Tensor | None:
    path = _cache_file(key)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            feats = torch.from_numpy(np.array(z["features"], dtype=np.float32))
            meta = json.loads(str(z["meta"]))
    except (OSError, ValueError, KeyError):
        return None  # unreadable cache entry: recompute (and overwrite it)
    if feats.dim() != 2 or feats.shape[1] != feature_dim or meta.get("key") != [str(k) for k in key]:
        return None
    return feats


def _save_disk(key: tuple, feats: Tensor) -> None:
    import io

    from arelbo.fileio import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez(buffer, features=feats.numpy(), meta=np.array(json.dumps({"key": [str(k) for k in key]})))
    try:
        atomic_write_bytes(_cache_file(key), buffer.getvalue())
    except OSError as e:  # a read-only home must not break an evaluation
        warnings.warn(f"could not write the FID reference cache {_cache_file(key)}: {e}", stacklevel=3)


def clear_reference_cache() -> None:
    """Forget the in-memory reference features (the disk cache stays)."""
    _REFERENCE_CACHE.clear()


def _resolve_reference(reference: Tensor | Iterable, reference_name: str | None) -> tuple[Any, str]:
    if isinstance(reference, str):
        raise TypeError(f"reference {reference!r} is a name: pass the images, e.g. "
                        f"arelbo.data.reference_images({reference!r}), with reference_name={reference!r}")
    return reference, reference_name or "custom"


def reference_features(reference: Tensor | Iterable, feature_net: str = "mnist-features",
                       reference_name: str | None = None, batch_size: int = 500, quantize: bool = True,
                       disk_cache: bool = True, progress: bool = False) -> tuple[Tensor, str, str]:
    """Features of the reference set: (float32 (N, F), reference name, where they came from).

    Cached per (feature-net weights sha256, reference name, count, content hash) for tensors. Iterables are
    featurised every time (not cached).
    """
    module, info = get_feature_net(feature_net)
    reference, name = _resolve_reference(reference, reference_name)
    fid_id = info["weights_sha256"] or info["name"]
    if isinstance(reference, Tensor):
        # how the net is run is part of the key: reference and generated features come from the same computation
        key = (fid_id, info.get("inference", "as trained"), name, reference.shape[0], _content_hash(reference),
               f"q{int(quantize)}")
    else:
        key = None
    if key is not None and key in _REFERENCE_CACHE:
        return _REFERENCE_CACHE[key], name, "memory"
    if key is not None and disk_cache:
        feats = _load_disk(key, info["feature_dim"])
        if feats is not None:
            _REFERENCE_CACHE[key] = feats
            return feats, name, "disk"
    feats = featurize(reference, module, batch_size=batch_size, quantize=quantize, progress=progress,
                      desc=f"features {name}")
    if key is not None:
        _REFERENCE_CACHE[key] = feats
        if disk_cache:
            _save_disk(key, feats)
    return feats, name, "computed"


# ------------------------------------------------------------------------------------------------ FID / KID

def fid_from_features(generated: Tensor, reference: Tensor) -> float:
    """torchmetrics' FID (float64 statistics) between two (N, F) feature matrices."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    with torch.inference_mode():
        metric = FrechetInceptionDistance(feature=_Precomputed(reference.shape[1]), normalize=True)
        metric.update(reference.double(), real=True)
        metric.update(generated.double(), real=False)
        return float(metric.compute())


def kid_from_features(generated: Tensor, reference: Tensor, subsets: int = 100, subset_size: int = 1000,
                      seed: int = 0) -> tuple[float, float]:
    """torchmetrics' KID (cubic polynomial kernel, mean and std over random subsets; subsets drawn with ``seed``)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    with torch.inference_mode(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        torch.manual_seed(seed)
        metric = KernelInceptionDistance(feature=_Precomputed(reference.shape[1]), subsets=subsets,
                                         subset_size=subset_size, normalize=True)
        metric.update(reference.double(), real=True)
        metric.update(generated.double(), real=False)
        mean, std = metric.compute()
        return float(mean), float(std)


def compute_fid(generated: Tensor | Iterable, reference: Tensor | Iterable,
                feature_net: str = "mnist-features", batch_size: int = 500, kid: bool = False,
                kid_subset_size: int | None = None, kid_subsets: int = 100, seed: int = 0,
                reference_name: str | None = None, quantize: bool = True, disk_cache: bool = True,
                progress: bool = False) -> dict[str, Any]:
    """FID (and optionally KID) of generated images against a reference set, with the protocol that produced it.

    ``generated``/``reference``: tensors (uint8, or float in [0, 1]) of shape (N, C, H, W), or iterables of such
    batches (a dataset split by name: :func:`arelbo.data.reference_images`). ``reference_name`` labels the
    reference in the protocol and the cache key (default 'custom'). ``seed`` draws the
    KID subsets and is recorded (pass the seed that drew the samples when you have one).

    Returns ``{"fid", ["kid_mean", "kid_std"], "protocol": {...}, "reference_cache", "seconds"}``.
    """
    import torchmetrics

    t0 = time.perf_counter()
    _, info = get_feature_net(feature_net)
    gen = featurize(generated, feature_net, batch_size=batch_size, quantize=quantize, progress=progress,
                    desc="features generated")
    t1 = time.perf_counter()
    ref, name, source = reference_features(reference, feature_net, reference_name, batch_size=batch_size,
                                           quantize=quantize, disk_cache=disk_cache, progress=progress)
    t2 = time.perf_counter()
    if gen.shape[0] < 2 or ref.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images per set (got {gen.shape[0]} generated, {ref.shape[0]} reference)")
    result: dict[str, Any] = {"fid": fid_from_features(gen, ref)}
    protocol: dict[str, Any] = {
        "metric": "fid+kid" if kid else "fid",
        "feature_net": info["name"],
        "weights_sha256": info["weights_sha256"],
        "feature_dim": info["feature_dim"],
        **({"inference": info["inference"]} if "inference" in info else {}),
        "n_generated": int(gen.shape[0]),
        "n_reference": int(ref.shape[0]),
        "reference": {"name": name, "count": int(ref.shape[0])},
        "preprocessing": (QUANTIZE_NOTE if quantize else "float images clamped to [0,1]; uint8 / 255")
                         + "; then " + info["preprocessing"],
        "statistics": "float64 (torchmetrics FrechetInceptionDistance with a custom feature module)",
        "seed": seed,
        "torchmetrics": torchmetrics.__version__,
    }
    if kid:
        size = kid_subset_size or min(1000, gen.shape[0], ref.shape[0])
        if size > min(gen.shape[0], ref.shape[0]) or size < 2:
            raise ValueError(f"kid_subset_size {size} must be in [2, min(n_generated, n_reference)="
                             f"{min(gen.shape[0], ref.shape[0])}]")
        result["kid_mean"], result["kid_std"] = kid_from_features(gen, ref, kid_subsets, size, seed)
        protocol["kid"] = {"subsets": kid_subsets, "subset_size": size, "kernel": "polynomial degree 3, "
                           "gamma 1/feature_dim, coef 1 (torchmetrics KernelInceptionDistance)"}
    t3 = time.perf_counter()
    result["protocol"] = protocol
    result["reference_cache"] = source
    result["seconds"] = {"generated_features": round(t1 - t0, 3), "reference_features": round(t2 - t1, 3),
                         "statistics": round(t3 - t2, 3), "total": round(t3 - t0, 3)}
    return result
