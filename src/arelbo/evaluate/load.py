"""Stage 0: the run, its checkpoint and the data it is evaluated on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arelbo.evaluate.common import dequantized, generator, resolve_device

__all__ = ["Loaded", "load", "default_feature_net", "parse_samplers"]


def default_feature_net(shape) -> str:
    return "mnist-features" if tuple(shape) == (1, 28, 28) else "inception"


def parse_samplers(samplers) -> list[str]:
    if samplers is None:
        return []
    if isinstance(samplers, str):
        samplers = samplers.split(",")
    names = [s.strip() for s in samplers if s and s.strip()]
    from arelbo.samplers import SAMPLERS

    unknown = [s for s in names if s not in SAMPLERS]
    if unknown:
        raise ValueError(f"unknown sampler(s) {unknown}; known: {', '.join(sorted(SAMPLERS))}")
    return list(dict.fromkeys(names))


@dataclass
class Loaded:
    """Stage 0: the run and the data it is evaluated on."""

    run_dir: Path
    ckpt_file: Path
    ckpt: dict
    cfg: dict  # the run's config (as saved in the checkpoint)
    model: Any
    loss_fn: Any
    device: str
    splits: Any
    eval_data: Any  # the evaluation split (uint8 images or floats), capped at max_examples
    train_data: Any  # what the samplers are fitted on
    score_data: Any  # what the likelihoods score (eval_data, dequantised when asked)
    val_data: Any  # the validation split (capped at max_examples): samplers choose on it
    val_score: Any  # ... in the form the likelihoods score: where data-estimated sigma2 is fitted
    loader: Any  # batches of score_data
    is_image: bool
    sampler_names: list[str]
    sampler_options: dict



def load(run_dir: Path, c) -> Loaded:
    import torch

    from arelbo.data import load_dataset, make_loader
    from arelbo.runs import checkpoint_path, load_model

    sampler_names = parse_samplers(c.samplers)
    if c.feature_net is not None:
        from arelbo.metrics.features import FEATURE_NETS

        if c.feature_net not in FEATURE_NETS:
            raise ValueError(f"--feature-net: unknown feature network {c.feature_net!r}; choose from "
                             f"{', '.join(sorted(FEATURE_NETS))}")
    sampler_options = dict(c.sampler_options or {})
    bad = sorted(set(sampler_options) - set(sampler_names))
    if bad:
        raise ValueError(f"options given for sampler(s) {bad} that are not being evaluated ({sampler_names})")

    device = resolve_device(c.device)
    ckpt_file = checkpoint_path(run_dir, c.which)
    model, loss_fn, ckpt = load_model(run_dir, c.which, map_location=device)
    model.to(device)
    if torch.device(device).type == "cpu":
        # the same values (convolutions in another memory order); MNIST's conv decoder runs 1.7x faster on CPU
        model.to(memory_format=torch.channels_last)
    cfg = ckpt["config"]
    data_cfg = cfg.get("data")
    if not isinstance(data_cfg, dict) or "name" not in data_cfg:
        raise ValueError(f"the checkpoint's config has no data section naming the dataset: {ckpt_file}")
    splits = load_dataset(data_cfg["name"], c.data_root or data_cfg.get("root"), **(data_cfg.get("options") or {}))
    eval_data = splits.split(c.split)
    train_data = splits.train
    if c.max_examples is not None:
        eval_data, train_data = eval_data[: c.max_examples], train_data[: c.max_examples]
    if c.fit_examples is not None:
        train_data = train_data[: c.fit_examples]
    is_image = eval_data.dtype == torch.uint8
    if c.dequantize and not is_image:
        raise ValueError(f"dequantize needs uint8 images; the {splits.name} data are {eval_data.dtype}")
    val_data = splits.val if c.max_examples is None else splits.val[: c.max_examples]
    score_data, val_score = eval_data, val_data
    if c.dequantize:  # float copies with uniform noise inside each pixel's 1/255 bin (FID keeps the uint8 data)
        score_data = dequantized(eval_data, generator(c.seed, "dequantize"))
        val_score = dequantized(val_data, generator(c.seed, "dequantize-val"))
    loader = make_loader(score_data, c.batch_size, shuffle=False)
    return Loaded(run_dir, ckpt_file, ckpt, cfg, model, loss_fn, device, splits, eval_data, train_data, score_data,
                  val_data, val_score, loader, is_image, sampler_names, sampler_options)


