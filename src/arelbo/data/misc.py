"""Smaller sources: CIFAR-10 pickle batches, user .npz arrays, and synthetic Gaussians for linear VAEs."""

from __future__ import annotations

import hashlib
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from .core import SPLIT_NAMES, SPLIT_RULE_801010, DatasetError, Splits, register, split_counts, tail_split

# ---------------------------------------------------------------------------------------------- CIFAR-10

CIFAR_DIR, CIFAR_TAR = "cifar-10-batches-py", "cifar-10-python.tar.gz"
CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


# md5 of the official archive and of each batch inside it (https://www.cs.toronto.edu/~kriz/cifar.html; the same
# values torchvision checks). The batches are pickles, and unpickling runs code: only these exact files are opened.
CIFAR_MD5 = {
    CIFAR_TAR: "c58f30108f718f92721af3b95e74349a",
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}


def _check_md5(data: bytes, key: str, where) -> None:
    if hashlib.md5(data).hexdigest() != CIFAR_MD5.get(key):
        raise DatasetError(f"{where} is not the official CIFAR-10 file (md5 mismatch); it is not opened (its pickles "
                           f"could run code): fetch {CIFAR_TAR} again from https://www.cs.toronto.edu/~kriz/cifar.html")


def _cifar_reader(root: Path):
    """A function batch name -> raw bytes, from the extracted folder or straight from the tar.gz; every byte
    returned has passed its md5 check (the archive's, or each batch file's)."""
    for d in (root, root / CIFAR_DIR):
        if all((d / b).is_file() for b in CIFAR_BATCHES):
            def read(b, d=d):
                data = (d / b).read_bytes()
                _check_md5(data, b, d / b)
                return data
            return read, str(d)
    for tar in (root, root / CIFAR_TAR):
        if tar.is_file() and tar.name.endswith((".tar.gz", ".tgz")):
            _check_md5(tar.read_bytes(), CIFAR_TAR, tar)
            with tarfile.open(tar, "r:gz") as tf:
                raw = {Path(m.name).name: tf.extractfile(m).read() for m in tf.getmembers()
                       if m.isfile() and Path(m.name).name in CIFAR_BATCHES}
            if len(raw) == len(CIFAR_BATCHES):
                return raw.__getitem__, str(tar)
    raise DatasetError(f"no CIFAR-10 found under {root}: put {CIFAR_TAR} (python version, from "
                       f"https://www.cs.toronto.edu/~kriz/cifar.html) or its extracted {CIFAR_DIR}/ there")


def _cifar_batch(read, name: str) -> tuple[np.ndarray, np.ndarray]:
    data = read(name)  # md5-checked: only the official files are unpickled
    try:
        d = pickle.loads(data, encoding="bytes")
        x = np.asarray(d[b"data"], dtype=np.uint8)
        y = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as e:
        raise DatasetError(f"CIFAR-10 batch {name} is unreadable ({e}); fetch the dataset again") from e
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
        raise DatasetError(f"CIFAR-10 batch {name} has data {x.shape} and {len(y)} labels; expected (N, 3072) + N")
    return x.reshape(-1, 3, 32, 32), y


@register("cifar10")
def cifar10(root=None, val_size: int = 5000) -> Splits:
    """CIFAR-10 (N, 3, 32, 32) uint8 with labels; val = last `val_size` of the 50k training images."""
    if root is None:
        raise DatasetError(f"cifar10 needs root=<dir with {CIFAR_DIR}/ or {CIFAR_TAR}>")
    read, source = _cifar_reader(Path(root))
    parts = [_cifar_batch(read, b) for b in CIFAR_BATCHES]
    x = np.concatenate([p[0] for p in parts[:5]])
    y = np.concatenate([p[1] for p in parts[:5]])
    x_tr, y_tr, x_va, y_va = tail_split(x, y, val_size, "cifar10")
    t = torch.from_numpy
    return Splits("cifar10", t(x_tr), t(x_va), t(parts[5][0]), t(y_tr), t(y_va), t(parts[5][1]),
                  info={"source": source, "preprocessing": "none (uint8, 3x32x32)",
                        "split": f"val = last {val_size} of data_batch_1..5, train = the rest, test = test_batch"})


# ---------------------------------------------------------------------------------------------- npz

def to_nchw(a: np.ndarray, what: str, channels_last: bool | None = None) -> np.ndarray:
    """(N,H,W) -> (N,1,H,W); (N,H,W,C) -> (N,C,H,W) when the last dim is 1/3/4 and dim 1 is not (or
    channels_last=True); (N,C,H,W) stays. Values: uint8 as is, float must be finite and in [0, 1]."""
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4:
        if channels_last is None:
            channels_last = a.shape[3] in (1, 3, 4) and a.shape[1] not in (1, 3, 4)
        if channels_last:
            a = a.transpose(0, 3, 1, 2)
    else:
        raise DatasetError(f"{what}: expected (N,H,W), (N,H,W,C) or (N,C,H,W), got shape {a.shape}")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise DatasetError(f"{what}: dtype {a.dtype} not supported; store uint8 pixels or floats in [0, 1]")
    if not np.isfinite(a).all():
        raise DatasetError(f"{what}: contains NaN or inf")
    if a.size and (a.min() < 0 or a.max() > 1):
        raise DatasetError(f"{what}: float values must lie in [0, 1], found [{a.min():.4g}, {a.max():.4g}]; "
                           "rescale, or store uint8 pixels")
    return np.ascontiguousarray(a, dtype=np.float32)


@register("npz")
def npz(root=None, channels_last: bool | None = None) -> Splits:
    """A .npz file (root = its path) with `train` [+ `val`, `test`, `<split>_labels`], or one `x`/`images`
    array [+ `labels`/`y`] split 80/10/10. Missing val/test are carved from the end of train
    (floor(10%) of it each, at least one)."""
    if root is None or not Path(root).is_file():
        raise DatasetError(f"npz dataset needs root=<path of a .npz file>, got {root}")
    if not zipfile.is_zipfile(root):
        with open(root, "rb") as fh:
            npy = fh.read(6) == b"\x93NUMPY"
        raise DatasetError(f"{root} is not an .npz file (not a zip archive"
                           + ("; it is a single .npy array" if npy else "") + "): write it with numpy.savez(path, "
                           "x=images) or numpy.savez(path, train=..., val=..., test=...)")
    try:
        with np.load(root, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise DatasetError(f"cannot read {root} as .npz: {e}") from e
    xs, ys = {}, {}
    if "train" in arrays:
        for s in SPLIT_NAMES:
            if s in arrays:
                xs[s], ys[s] = to_nchw(arrays[s], f"{root}[{s}]", channels_last), arrays.get(f"{s}_labels")
        rule = "train/val/test arrays as stored"
        n = len(xs["train"])
        for s in ("test", "val"):  # carve the missing ones from the end of train
            if s not in xs:
                k = max(1, n // 10)
                if len(xs["train"]) <= k:
                    raise DatasetError(f"{root}: train has too few samples to carve a {s} split; store {s!r}")
                xs[s], xs["train"] = xs["train"][-k:], xs["train"][:-k]
                y = ys["train"]
                ys[s], ys["train"] = (None, None) if y is None else (y[-k:], y[:-k])
                rule += f"; {s} = {k} samples carved from the end of train"
    else:
        key = next((k for k in ("x", "images") if k in arrays), None)
        if key is None:
            raise DatasetError(f"{root} holds {sorted(arrays)}; expected 'train' (+ 'val', 'test') or 'x'/'images'")
        x = to_nchw(arrays[key], f"{root}[{key}]", channels_last)
        y = next((arrays[k] for k in ("labels", "y") if k in arrays), None)
        if len(x) < 3:
            raise DatasetError(f"{root}[{key}] has {len(x)} samples; need at least 3")
        if y is not None and len(y) != len(x):
            raise DatasetError(f"{root}: {len(x)} samples but {len(y)} labels")
        a, b, _ = split_counts(len(x))
        cuts = dict(zip(SPLIT_NAMES, (slice(0, a), slice(a, a + b), slice(a + b, None))))
        xs = {s: x[c] for s, c in cuts.items()}
        ys = {s: None if y is None else y[c] for s, c in cuts.items()}
        rule = SPLIT_RULE_801010
    if len({xs[s].dtype for s in SPLIT_NAMES}) != 1 or len({xs[s].shape[1:] for s in SPLIT_NAMES}) != 1:
        raise DatasetError(f"{root}: splits differ in dtype or sample shape: "
                           f"{ {s: (xs[s].dtype.name, xs[s].shape[1:]) for s in SPLIT_NAMES} }")
    labels = {}
    for s in SPLIT_NAMES:
        y = ys.get(s)
        if (y is None) != (ys.get("train") is None):
            raise DatasetError(f"{root}: give labels for every split or for none")
        if y is not None:
            if y.ndim != 1 or len(y) != len(xs[s]) or not np.issubdtype(y.dtype, np.integer):
                raise DatasetError(f"{root}: {s} labels must be integers of shape ({len(xs[s])},), got {y.dtype} {y.shape}")
            labels[s] = torch.from_numpy(y.astype(np.int64))
    return Splits("npz", *(torch.from_numpy(xs[s]) for s in SPLIT_NAMES), *(labels.get(s) for s in SPLIT_NAMES),
                  info={"source": str(root), "split": rule, "preprocessing": f"as stored ({xs['train'].dtype.name})"})


# ---------------------------------------------------------------------------------------------- Gaussian

DEFAULT_EIGENVALUES = (5.0, 3.0, 1.5, 0.8, 0.5, 0.3, 0.2, 0.1)


@register("gaussian")
def gaussian(root=None, eigenvalues=DEFAULT_EIGENVALUES, n_train: int = 20000, n_val: int = 2000,
             n_test: int = 2000, seed: int = 0, rotate: bool = True) -> Splits:
    """x ~ N(0, C), C = Q diag(eigenvalues) Q^T (Q seeded Haar-random orthogonal; identity if not rotate).

    The linear VAE's optimum is known in closed form from C, so info carries C exactly. Samples are
    float32 shaped (N, D, 1, 1). Q and each split use their own seeded stream, so changing n_train
    leaves val and test unchanged.
    """
    lam = np.asarray(eigenvalues, dtype=np.float64)
    if lam.ndim != 1 or lam.size == 0 or not np.isfinite(lam).all() or (lam < 0).any():
        raise DatasetError(f"eigenvalues must be a non-empty list of finite numbers >= 0, got {eigenvalues}")
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    if any(int(n) < 1 for n in sizes.values()):
        raise DatasetError(f"n_train, n_val, n_test must be >= 1, got {sizes}")
    d = lam.size
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(4)]
    if rotate:
        q, r = np.linalg.qr(streams[0].standard_normal((d, d)))
        q = q * np.sign(np.diag(r))  # sign fix makes Q Haar-distributed
    else:
        q = np.eye(d)
    cov = (q * lam) @ q.T
    data = {s: torch.from_numpy(((rng.standard_normal((int(n), d)) * np.sqrt(lam)) @ q.T).astype(np.float32))
            .reshape(int(n), d, 1, 1) for (s, n), rng in zip(sizes.items(), streams[1:])}
    return Splits("gaussian", data["train"], data["val"], data["test"],
                  info={"source": f"synthetic N(0, C), seed {seed}", "eigenvalues": lam.tolist(),
                        "covariance": cov.tolist(), "rotation": q.tolist(), "rotate": bool(rotate),
                        "split": "independent seeded draws per split", "preprocessing": "none (float32, Dx1x1)"})
