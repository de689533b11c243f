"""Write the small CelebA-like test images kept in tests/data/celeba-like (run from the repository root).

Synthetic 178x218 RGB JPEGs in CelebA's aligned layout (img_align_celeba/000001.jpg, ...): a bright ellipse on a
coloured gradient with mild noise, so the loader's crop / resize / split / cache are tested on real JPEG files
anywhere, without CelebA itself (which may not be redistributed). Deterministic: the same seed gives the same
pixels; re-running rewrites identical files.
"""

from pathlib import Path

import numpy as np
from PIL import Image

N_IMAGES = 10
HERE = Path(__file__).parent / "celeba-like" / "img_align_celeba"


def make_image(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:218, :178].astype(np.float64)
    background = rng.uniform(20, 120, 3) + rng.uniform(-60, 60, 3) * (yy / 218)[..., None]
    cx, cy = 89 + rng.uniform(-10, 10), 115 + rng.uniform(-10, 10)
    face = np.exp(-((xx - cx) ** 2 / 1800 + (yy - cy) ** 2 / 3000))[..., None] * rng.uniform(100, 200, 3)
    return np.clip(background + face + rng.normal(0, 6, (218, 178, 3)), 0, 255).astype(np.uint8)


def main() -> None:
    HERE.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2026)
    for i in range(N_IMAGES):
        Image.fromarray(make_image(rng)).save(HERE / f"{i + 1:06d}.jpg", quality=85)


if __name__ == "__main__":
    main()
