"""Datasets for arelbo: every loader returns a `Splits` of in-memory tensors (see `core`).

`load_dataset(name, root, **options)` dispatches through `DATASETS`; importing the submodules below
registers mnist, fashion-mnist, celeba, cifar10, folder, npz and gaussian.
"""

from .core import (DATASETS, DatasetError, ImageTensorDataset, IndexDataset, Splits, collate_identity, load_dataset,
                   make_loader, reference_images, split_counts, to_float)
from .mapped import is_mapped, map_npy
from . import celeba, images, misc, mnist  # noqa: F401  (registration side effects)

__all__ = ["DATASETS", "DatasetError", "ImageTensorDataset", "IndexDataset", "Splits", "collate_identity",
           "is_mapped", "load_dataset", "make_loader", "map_npy", "reference_images", "split_counts", "to_float"]
