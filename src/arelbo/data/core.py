"""The dataset contract shared by every loader: `Splits`, the registry, and the in-memory loader.

The loaders return whole uint8 (or float32) tensors and batching is one tensor index per batch instead of
one Python call per sample: that keeps the input pipeline off the profile of small VAEs. A tensor may be
memory-mapped from a cache file (`mapped`, option ``mmap`` of the image-folder datasets) for data larger than RAM.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

SPLIT_NAMES = ("train", "val", "test")


class DatasetError(ValueError):
    """A user-facing data problem; the message says what is wrong and what to do about it."""


@dataclass(repr=False)
class Splits:
    """The three splits of one dataset, plus provenance in `info` (source, split rule, preprocessing)."""

    name: str
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Catch a loader bug here rather than as a shape error deep inside a training step.
        shapes = {s: tuple(self.split(s).shape[1:]) for s in SPLIT_NAMES}
        dtypes = {s: self.split(s).dtype for s in SPLIT_NAMES}
        if len(set(shapes.values())) != 1 or len(set(dtypes.values())) != 1 or len(shapes["train"]) != 3:
            raise DatasetError(f"{self.name}: splits must share one (C, H, W) shape and dtype, got {shapes}, {dtypes}")
        for s in SPLIT_NAMES:
            y = self.labels(s)
            if y is not None and len(y) != len(self.split(s)):
                raise DatasetError(f"{self.name}: {s} has {len(self.split(s))} samples but {len(y)} labels")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample."""
        return tuple(self.train.shape[1:])  # type: ignore[return-value]

    def split(self, name: str) -> torch.Tensor:
        return getattr(self, _check_split(name))

    def labels(self, name: str) -> torch.Tensor | None:
        return getattr(self, _check_split(name) + "_labels")

    def __repr__(self) -> str:
        sizes = "/".join(str(len(self.split(s))) for s in SPLIT_NAMES)
        return f"Splits({self.name!r}, train/val/test={sizes}, shape={self.shape}, dtype={self.train.dtype})"


def _check_split(name: str) -> str:
    if name not in SPLIT_NAMES:
        raise DatasetError(f"unknown split {name!r}: use one of {', '.join(SPLIT_NAMES)}")
    return name


# ---------------------------------------------------------------------------------------------- registry

DATASETS: dict[str, Callable[..., Splits]] = {}


def register(name: str):
    """Decorator adding a loader `fn(root=None, **options) -> Splits` to `DATASETS`."""

    def deco(fn):
        DATASETS[name] = fn
        return fn

    return deco


def load_dataset(name: str, root: str | os.PathLike | None = None, **options) -> Splits:
    """Load dataset `name` (see `DATASETS`) from `root` with loader-specific keyword `options`."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}: known datasets are {', '.join(sorted(DATASETS))}")
    fn = DATASETS[key]
    params = inspect.signature(fn).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        allowed = ", ".join(p for p in params if p != "root")
        raise DatasetError(f"dataset {key!r} has no option {', '.join(map(repr, unknown))}; its options are: {allowed}")
    if root is not None:
        root = Path(root).expanduser()
    return fn(root=root, **options)


# ---------------------------------------------------------------------------------------------- helpers


def reference_images(spec: str, root: str | os.PathLike | None = None) -> torch.Tensor:
    """The images of a ``"DATASET:SPLIT"`` name (e.g. ``"mnist:test"``): a reference set for FID."""
    dataset, _, split = str(spec).partition(":")
    if not split:
        raise DatasetError(f"reference {spec!r} must be 'DATASET:SPLIT', e.g. 'mnist:test'")
    return load_dataset(dataset, root).split(split)

def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1]; float data (e.g. Gaussians) -> float32 unchanged."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    if x.is_floating_point():
        return x.to(torch.float32)
    raise DatasetError(f"expected uint8 or floating-point samples, got {x.dtype}")


def split_counts(n: int) -> tuple[int, int, int]:
    """The deterministic 80/10/10 rule: first floor(0.8n) train, next floor(0.1n) val, rest test.

    With n >= 3 every split gets at least one sample (taken from train), so tiny folders still work.
    """
    n_train, n_val = n * 8 // 10, n // 10
    n_test = n - n_train - n_val
    if n >= 3:
        if n_val == 0:
            n_train, n_val = n_train - 1, 1
        if n_test == 0:
            n_train, n_test = n_train - 1, 1
    return n_train, n_val, n_test


SPLIT_RULE_801010 = "sorted order; first floor(0.8n) train, next floor(0.1n) val, rest test (>=1 each when n>=3)"


def tail_split(x, y, val_size: int, what: str):
    """Official train set -> (train, val): validation is the last `val_size` samples (a fixed, documented rule)."""
    n = len(x)
    if not 0 < val_size < n:
        raise DatasetError(f"{what}: val_size must be between 1 and {n - 1} (the train set has {n} samples), got {val_size}")
    yt = None if y is None else y[: n - val_size]
    yv = None if y is None else y[n - val_size:]
    return x[: n - val_size], yt, x[n - val_size:], yv


# ---------------------------------------------------------------------------------------------- loading

class ImageTensorDataset(Dataset):
    """In-memory samples, batched by one tensor index op, not per-item Python calls.

    `DataLoader` calls `__getitems__` with a whole batch of indices (any sampler, including
    `DistributedSampler`), so a batch costs one gather + one uint8->float conversion.
    """

    def __init__(self, data: torch.Tensor, labels: torch.Tensor | None = None):
        if labels is not None and len(labels) != len(data):
            raise DatasetError(f"{len(data)} samples but {len(labels)} labels")
        from .mapped import is_mapped

        self.data = data
        self.labels = labels
        self.mapped = is_mapped(data)  # memory-mapped: drop the pages each batch touched once it is gathered

    def __len__(self) -> int:
        return len(self.data)

    def _gather(self, index) -> torch.Tensor:
        x = to_float(self.data[index])
        if self.mapped:
            from .mapped import release

            release(self.data)
        return x

    def __getitem__(self, i):
        x = self._gather(i)
        return x if self.labels is None else (x, self.labels[i])

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self._gather(idx)
        return x if self.labels is None else (x, self.labels[idx])


class IndexDataset(Dataset):
    """Yields batches of sample indices (int64), for data that already live on the accelerator: the module gathers
    the samples there, so only the indices cross from the host."""

    def __init__(self, n: int):
        self.n = int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return torch.tensor(i, dtype=torch.long)

    def __getitems__(self, indices):
        return torch.as_tensor(indices, dtype=torch.long)


def collate_identity(batch):
    """`__getitems__` already returns a batch; module-level so the loader pickles (Lightning, spawn)."""
    return batch


def make_loader(data: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0,
                drop_last: bool = False, labels: torch.Tensor | None = None) -> DataLoader:
    """A reproducible in-process loader: the shuffle order depends only on `seed` and the epoch count."""
    if int(batch_size) < 1:
        raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(ImageTensorDataset(data, labels), batch_size=int(batch_size), shuffle=shuffle,
                      generator=generator, drop_last=drop_last, collate_fn=collate_identity, num_workers=0)
