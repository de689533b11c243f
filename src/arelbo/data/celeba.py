"""CelebA (aligned): a folder of JPEGs with the paper's preprocessing (centre crop 140, resize 64).

Splits follow the official `list_eval_partition.txt` (0 train, 1 val, 2 test) when it is found in root,
root/Eval, root's parent or its parent's Eval; otherwise the documented 80/10/10 rule on sorted names.
Decoding and caching are shared with the `folder` dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .core import SPLIT_NAMES, SPLIT_RULE_801010, DatasetError, Splits, register, split_counts
from .images import describe, list_images, load_images_cached, splits_from_array

PARTITION = "list_eval_partition.txt"


def find_image_dir(root: Path) -> Path:
    """root/img_align_celeba, root/celeba/img_align_celeba, or root itself if it holds images."""
    for d in (root / "img_align_celeba", root / "celeba" / "img_align_celeba", root):
        if d.is_dir() and list_images(d, recursive=False):
            return d
    raise DatasetError(f"no CelebA images found: expected {root}/img_align_celeba/*.jpg (or root=<that folder>); "
                       "download img_align_celeba.zip from the CelebA site and unzip it there")


def find_partition(root: Path, img_dir: Path) -> Path | None:
    for d in dict.fromkeys((root, root / "Eval", img_dir.parent, img_dir.parent / "Eval", root.parent, root.parent / "Eval")):
        if (d / PARTITION).is_file():
            return d / PARTITION
    return None


def read_partition(path: Path) -> dict[str, int]:
    """'000001.jpg 0' lines -> {file name: 0 | 1 | 2}."""
    table = {}
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DatasetError(f"{path}:{i}: expected '<image name> <0|1|2>', got {line!r}")
        table[parts[0]] = int(parts[1])
    return table


@register("celeba")
def celeba(root=None, crop=140, size=64, limit: int | None = None, cache_dir=None, partition_file=None,
           workers: int | None = None, mmap: bool = False) -> Splits:
    """CelebA aligned images -> (N, 3, size, size) uint8.

    mmap: memory-map the uint8 cache instead of loading it (bounded memory; see arelbo.data.mapped).
    partition_file: None = search for list_eval_partition.txt, a path = use it, False = 80/10/10 rule.
    limit: keep at most `limit` images, split in the 80/10/10 proportions (per official split if partitioned).
    """
    if root is None:
        raise DatasetError("celeba needs root=<dir containing img_align_celeba/> (and optionally list_eval_partition.txt)")
    root = Path(root)
    img_dir = find_image_dir(root)
    files = list_images(img_dir, recursive=False)
    part_path = find_partition(root, img_dir) if partition_file is None else (Path(partition_file) if partition_file else None)
    quotas = split_counts(int(limit)) if limit is not None else None
    if part_path is not None:
        table = read_partition(part_path)
        groups = [[f for f in files if table.get(f) == k] for k in range(3)]
        if quotas:
            groups = [g[:q] for g, q in zip(groups, quotas)]
        rule = (f"official partition {part_path} (0 train, 1 val, 2 test); "
                f"{sum(f not in table for f in files)} images not listed there were skipped")
    else:
        files = files[: int(limit)] if limit is not None else files
        counts = split_counts(len(files))
        groups = [files[: counts[0]], files[counts[0]: counts[0] + counts[1]], files[counts[0] + counts[1]:]]
        rule = SPLIT_RULE_801010
    empty = [s for s, g in zip(SPLIT_NAMES, groups) if not g]
    if empty:
        raise DatasetError(f"celeba: no images for split(s) {', '.join(empty)} in {img_dir} "
                           f"(partition: {part_path}); add images or pass partition_file=False for the 80/10/10 rule")
    selected = [f for g in groups for f in g]
    arr, cache = load_images_cached(img_dir, selected, crop, size, 3, root, cache_dir, "celeba", workers, mmap)
    info = {"source": str(img_dir), "split": rule, "preprocessing": describe(crop, size, 3),
            "file_range": {s: [g[0], g[-1]] for s, g in zip(SPLIT_NAMES, groups)}, **cache}
    arr = arr if mmap else np.ascontiguousarray(arr)
    return splits_from_array("celeba", arr, tuple(len(g) for g in groups), info)
