"""Folders of image files: decode once (centre crop, bilinear resize), cache as .npy, split 80/10/10.

Decoding ~200k CelebA JPEGs takes minutes; the cached uint8 array loads in seconds. The cache lives in
`<root>/.arelbo-cache/` next to the data, or in the user cache (`$XDG_CACHE_HOME/arelbo`, default
`~/.cache/arelbo`) when the data folder is read-only. Its file name hashes the file list (relative
names and byte sizes), crop, size and channels, so a changed folder or option never reads a stale cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .core import SPLIT_RULE_801010, DatasetError, Splits, register, split_counts
from .mapped import map_npy

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp"}
CACHE_VERSION = 1


def list_images(folder: Path, recursive: bool = True) -> list[str]:
    """Image files under `folder` as sorted POSIX paths relative to it (sorted => deterministic splits)."""
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p.relative_to(folder).as_posix() for p in it
                  if p.suffix.lower() in IMAGE_EXTS and p.is_file() and ".arelbo-cache" not in p.parts)


def _pair(v, what: str) -> tuple[int, int] | None:
    """int -> (v, v); (h, w) -> (h, w); None -> None."""
    if v is None:
        return None
    h, w = (v, v) if isinstance(v, (int, np.integer)) else tuple(v)
    if int(h) < 1 or int(w) < 1:
        raise DatasetError(f"{what} must be positive, got {v}")
    return int(h), int(w)


def centre_crop_box(width: int, height: int, crop_h: int, crop_w: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a centred crop, rounding offsets like torchvision's CenterCrop."""
    left, top = int(round((width - crop_w) / 2.0)), int(round((height - crop_h) / 2.0))
    return left, top, left + crop_w, top + crop_h


def decode_image(path: Path, crop=None, size=None, channels: int = 3) -> np.ndarray:
    """One image -> (C, H, W) uint8: convert to RGB/L, centre crop, bilinear resize (antialiased by PIL)."""
    from PIL import Image, UnidentifiedImageError  # here: the in-memory datasets need no image library

    crop, size = _pair(crop, "crop"), _pair(size, "size")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DatasetError(f"cannot read image {path}: {e}; remove or replace the file") from e
    if crop is not None:
        if crop[0] > im.height or crop[1] > im.width:
            raise DatasetError(f"crop {crop[0]}x{crop[1]} (HxW) is larger than image {path} ({im.height}x{im.width}); "
                               "pass a smaller crop")
        im = im.crop(centre_crop_box(im.width, im.height, *crop))
    if size is not None and (im.height, im.width) != size:
        im = im.resize((size[1], size[0]), Image.BILINEAR)
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def decode_images(folder: Path, relpaths: list[str], crop=None, size=None, channels: int = 3,
                  workers: int | None = None) -> np.ndarray:
    """Decode many images in threads (PIL releases the GIL) into one (N, C, H, W) uint8 array."""
    if channels not in (1, 3):
        raise DatasetError(f"channels must be 1 or 3, got {channels}")
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(lambda r: decode_image(folder / r, crop, size, channels), relpaths))
    for r, a in zip(relpaths, arrays):
        if a.shape != arrays[0].shape:
            raise DatasetError(f"images differ in size: {relpaths[0]} is {arrays[0].shape[1:]} but {r} is {a.shape[1:]} "
                               "(HxW after crop); pass size=... (and/or crop=...) to make them equal")
    # contiguous (N, C, H, W): stacking the transposed decodes would keep their channels-last strides, and a
    # freshly decoded dataset would then train with other float rounding than the same data read from the cache
    return np.ascontiguousarray(np.stack(arrays)) if arrays else np.zeros((0, channels, 1, 1), np.uint8)


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "arelbo"


def writable_dir(d: Path) -> bool:
    """Whether we may create files in `d` (or in its nearest existing ancestor, where it would be made).

    Besides os.access, the permission bits must grant write to someone: a data folder marked read-only
    (mode r-x) stays untouched even by root, which os.access alone would allow.
    """
    p = d
    while not p.exists() and p != p.parent:
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK) and bool(p.stat().st_mode & 0o222)


def cache_key(folder: Path, relpaths: list[str], crop, size, channels: int) -> str:
    """Hash of what determines the decoded array: file names + byte sizes, crop, size, channels."""
    files = [(r, (folder / r).stat().st_size) for r in relpaths]
    blob = json.dumps({"v": CACHE_VERSION, "files": files, "crop": _pair(crop, "crop"), "size": _pair(size, "size"),
                       "channels": channels}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


STREAM_CHUNK_BYTES = 16 << 20  # decoded images held in memory at once while a memory-mapped cache is written


def _write_npy_streaming(f, folder: Path, relpaths: list[str], crop, size, channels: int, workers) -> None:
    """Decode the images chunk by chunk straight into an open .npy file: memory stays one chunk, not the dataset."""
    first = decode_image(folder / relpaths[0], crop, size, channels)
    np.lib.format.write_array_header_1_0(  # what np.save writes: the same bytes as an in-memory cache
        f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
            "shape": (len(relpaths), *first.shape)})
    per_chunk = max(1, STREAM_CHUNK_BYTES // first.nbytes)
    buffer = np.empty((min(per_chunk, len(relpaths)), *first.shape), np.uint8)

    def decode_into(i: int, relpath: str) -> None:
        a = decode_image(folder / relpath, crop, size, channels)
        if a.shape != first.shape:
            raise DatasetError(f"images differ in size: {relpaths[0]} is {first.shape[1:]} but {relpath} is "
                               f"{a.shape[1:]} (HxW after crop); pass size=... (and/or crop=...) to make them equal")
        buffer[i] = a

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(relpaths), per_chunk):
            chunk = relpaths[start:start + per_chunk]
            list(pool.map(decode_into, range(len(chunk)), chunk))
            f.write(buffer[: len(chunk)].data)


def load_images_cached(folder: Path, relpaths: list[str], crop=None, size=None, channels: int = 3,
                       root: Path | None = None, cache_dir=None, tag: str = "images",
                       workers: int | None = None, mmap: bool = False) -> tuple[np.ndarray | torch.Tensor, dict]:
    """Decoded images, read from the .npy cache when present, else decoded and written to the first
    writable cache directory. Returns (array, info) with the cache path and whether it was a hit.

    ``mmap``: return a tensor memory-mapped from the cache instead of reading it into memory (and write a new
    cache chunk by chunk), so neither building nor training on a dataset bigger than RAM needs that much memory.
    """
    fname = f"{tag}-{len(relpaths)}-{cache_key(folder, relpaths, crop, size, channels)}.npy"
    if cache_dir is not None:
        dirs = [Path(cache_dir).expanduser()]
    else:
        dirs = [Path(root or folder) / ".arelbo-cache", user_cache_dir()]
    for d in dirs:
        if (d / fname).is_file():
            try:
                a = map_npy(d / fname) if mmap else np.load(d / fname, allow_pickle=False)
                if a.dtype in (np.uint8, torch.uint8) and a.ndim == 4 and len(a) == len(relpaths):
                    return a, {"cache": str(d / fname), "cache_hit": True, "mmap": bool(mmap)}
            except (OSError, ValueError):
                pass  # a damaged cache is rebuilt below
    if mmap:
        for d in dirs:
            if not writable_dir(d):
                continue
            d.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=d, suffix=".tmp", delete=False) as f:
                tmp = Path(f.name)
                try:
                    _write_npy_streaming(f, folder, relpaths, crop, size, channels, workers)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
            _publish(tmp, d / fname)
            return map_npy(d / fname), {"cache": str(d / fname), "cache_hit": False, "mmap": True}
        raise DatasetError(f"mmap=True needs a writable cache directory (tried {', '.join(str(d) for d in dirs)}); "
                           "pass cache_dir=<a writable directory>")
    arr = decode_images(folder, relpaths, crop, size, channels, workers)
    for d in dirs:
        tmp = None
        if not writable_dir(d):
            continue
        try:
            d.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=d, suffix=".tmp", delete=False) as f:
                tmp = Path(f.name)
                np.save(f, arr)
            _publish(tmp, d / fname)
            return arr, {"cache": str(d / fname), "cache_hit": False}
        except OSError:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
    if cache_dir is not None:
        raise DatasetError(f"cannot write the image cache into cache_dir={cache_dir}; pass a writable directory")
    warnings.warn(f"no writable cache directory among {[str(d) for d in dirs]}; images will be decoded again next time",
                  stacklevel=2)
    return arr, {"cache": None, "cache_hit": False}


def _publish(tmp: Path, path: Path) -> None:
    """Give a finished temporary cache file its name atomically, with umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # NamedTemporaryFile makes 0600; the cache may be shared
    os.replace(tmp, path)


def describe(crop, size, channels: int) -> str:
    crop, size = _pair(crop, "crop"), _pair(size, "size")
    return (f"{'RGB' if channels == 3 else 'grayscale'}"
            + (f", centre crop {crop[0]}x{crop[1]}" if crop else "")
            + (f", PIL bilinear (antialiased) resize to {size[0]}x{size[1]}" if size else ", native size")
            + ", uint8")


def splits_from_array(name: str, arr: np.ndarray | torch.Tensor, counts: tuple[int, int, int], info: dict) -> Splits:
    """Consecutive blocks of `arr` of sizes `counts` -> Splits (arr is ordered train, val, test; views, no copy)."""
    t = arr if isinstance(arr, torch.Tensor) else torch.from_numpy(arr)
    a, b = counts[0], counts[0] + counts[1]
    return Splits(name=name, train=t[:a], val=t[a:b], test=t[b:], info=info)


@register("folder")
def folder(root=None, size=None, channels: int = 3, crop=None, limit: int | None = None, cache_dir=None,
           recursive: bool = True, workers: int | None = None, mmap: bool = False) -> Splits:
    """Any folder of png/jpg/jpeg/bmp images (recursive, sorted), split 80/10/10 in sorted order.

    `size` (int or (h, w)) resizes; without it all images (after the optional centre `crop`) must match.
    `mmap`: memory-map the uint8 cache instead of loading it (datasets larger than RAM).
    """
    if root is None or not Path(root).is_dir():
        raise DatasetError(f"folder dataset needs root=<a directory of images>, got {root}")
    root = Path(root)
    files = list_images(root, recursive)
    if limit is not None:
        files = files[: int(limit)]
    if len(files) < 3:
        raise DatasetError(f"found {len(files)} images ({', '.join(sorted(IMAGE_EXTS))}) under {root}; "
                           "need at least 3 (one per split)")
    size = _pair(size, "size") or _pair(crop, "crop")
    arr, cache = load_images_cached(root, files, crop, size, channels, root, cache_dir, "folder", workers, mmap)
    info = {"source": str(root), "n_files": len(files), "split": SPLIT_RULE_801010,
            "preprocessing": describe(crop, size, channels),
            **cache}
    return splits_from_array("folder", arr, split_counts(len(files)), info)
