"""Memory-mapped uint8 arrays: a dataset larger than RAM as an ordinary tensor with bounded resident memory.

`map_npy` maps a .npy file (private, copy-on-write: the file is never written) and returns a torch tensor on the
mapping, so every consumer indexes it like in-memory data. Pages a batch touched stay resident until dropped;
`release` (called by the loader after each gather) hands them back to the page cache with madvise(DONTNEED), so
the process's resident memory stays about one batch, not the dataset, while the kernel caches what fits.
"""

from __future__ import annotations

import mmap
import weakref
from pathlib import Path

import numpy as np
import torch

_MAPS: dict[int, mmap.mmap] = {}  # storage address -> its mapping


def map_npy(path: str | Path) -> torch.Tensor:
    """The array in a .npy file as a tensor backed by a private memory map (no copy into memory)."""
    path = Path(path)
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
        if fortran or dtype.hasobject:
            raise ValueError(f"{path}: cannot map a Fortran-ordered or object array")
        count = int(np.prod(shape))
        if count == 0:
            return torch.from_numpy(np.zeros(shape, dtype))
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    arr = np.frombuffer(mm, dtype=dtype, count=count, offset=offset).reshape(shape)
    t = torch.from_numpy(arr)
    ptr = t.untyped_storage().data_ptr()
    _MAPS[ptr] = mm
    weakref.finalize(arr, _MAPS.pop, ptr, None)  # forget the mapping with the last tensor on it
    return t


def is_mapped(t: torch.Tensor) -> bool:
    """Whether ``t`` (or the tensor it is a view of) comes from :func:`map_npy`."""
    return isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage().data_ptr() in _MAPS


def release(t: torch.Tensor) -> None:
    """Drop the resident pages of the mapping behind ``t`` (they are re-read from the page cache on demand)."""
    mm = _MAPS.get(t.untyped_storage().data_ptr()) if isinstance(t, torch.Tensor) else None
    if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)
