"""Fit and resume: the Lightning trainer built from the config, run under the run directory's lock."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl
import torch

from arelbo import runs
from arelbo.config import ConfigError, RunConfig
from arelbo.models import build_model
from arelbo.train.checkpoints import RunCheckpoint, RunCheckpointIO, SnapshotCheckpoint
from arelbo.train.data import EpochSampler, load_splits
from arelbo.train.errors import NonFiniteLossError, TrainingInterrupted
from arelbo.train.module import VAEModule
from arelbo.train.rundir import check_run_dir, clear_early_files, new_run_dir, save_run_config, truncate_metrics

__all__ = ["fit", "resume", "prepare", "check_environment", "build_trainer", "benchmark_steps", "RUN_DIR_ENV"]

RUN_DIR_ENV = "ARELBO_RUN_DIR"  # lets processes re-launched by the "ddp" strategy find their run directory

def check_environment(cfg: RunConfig) -> None:
    """Settings that depend on this machine, checked before anything is written."""
    t = cfg.train
    _check_precision(t)
    if t.accelerator == "gpu":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == 0:
            raise ConfigError("train.accelerator=gpu but no GPU is available here; use train.accelerator=cpu or auto")
        if t.devices > available:
            raise ConfigError(f"train.devices={t.devices} but only {available} GPU(s) are available")
    if cfg.data.batch_size % t.devices:
        raise ConfigError(f"data.batch_size {cfg.data.batch_size} must be divisible by train.devices {t.devices}")


def prepare(cfg: RunConfig, splits=None):
    """Validate everything that can be validated before a run directory is created or changed: the machine,
    the data (loaded here; returned), the model and objective (built once), the batch count."""
    check_environment(cfg)
    if splits is None:
        splits = load_splits(cfg)
    build_model(cfg.model, splits.shape)
    cfg.objective.build()
    d = cfg.data
    if len(EpochSampler(len(splits.train), d.batch_size, d.shuffle, cfg.train.seed, d.drop_last)) == 0:
        raise ConfigError(
            f"the training split has {len(splits.train)} samples, fewer than one batch of "
            f"data.batch_size={d.batch_size}; lower the batch size or set data.drop_last=false"
        )
    return splits


def _strategy(t):
    from lightning.pytorch.strategies import DDPStrategy

    if t.devices == 1:
        if t.strategy != "auto":
            warnings.warn(f"train.strategy={t.strategy} ignored with train.devices=1", stacklevel=2)
        return "auto"
    gpu = t.accelerator == "gpu" or (t.accelerator == "auto" and torch.cuda.is_available())
    start = "popen" if t.strategy == "ddp" else "spawn"
    return DDPStrategy(start_method=start, process_group_backend="nccl" if gpu else "gloo")


def _progress_bar():
    """Lightning's bar showing the last logged loss and sigma2 (host floats): reading a device value on every step
    would cost a host sync per step."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    class ProgressBar(TQDMProgressBar):
        def get_metrics(self, trainer, pl_module):
            return {**super().get_metrics(trainer, pl_module), **getattr(pl_module, "bar_values", {})}

    return ProgressBar()


def _tensorboard_available() -> bool:
    import importlib

    for name in ("tensorboard", "tensorboardX"):
        try:
            importlib.import_module(name)
            return True
        except ImportError:
            pass
    return False


def _check_precision(t) -> None:
    gpu = t.accelerator == "gpu" or (t.accelerator == "auto" and torch.cuda.is_available())
    if t.precision == "16-mixed" and not gpu:
        raise ConfigError(
            "train.precision=16-mixed (float16 with loss scaling) needs a CUDA GPU; on this device use "
            "train.precision=bf16-mixed or 32"
        )


def build_trainer(cfg: RunConfig, run_dir: Path, progress: bool = True, callbacks: Sequence = ()) -> pl.Trainer:
    from lightning.pytorch.loggers import TensorBoardLogger

    t = cfg.train
    _check_precision(t)
    accelerator = {"auto": "auto", "cpu": "cpu", "gpu": "gpu"}[t.accelerator]
    loggers = []
    if _tensorboard_available():
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="", version="tensorboard", default_hp_metric=False))
    else:
        warnings.warn("TensorBoard events are not written (neither tensorboard nor tensorboardX is installed: "
                      "pip install tensorboard); metrics.jsonl holds every record", stacklevel=2)
    return pl.Trainer(
        accelerator=accelerator,
        devices=t.devices,
        strategy=_strategy(t),
        precision={"32": "32-true"}.get(t.precision, t.precision),
        max_epochs=t.epochs,
        max_steps=-1 if t.max_steps is None else t.max_steps,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        gradient_clip_val=t.grad_clip,
        gradient_clip_algorithm="norm",
        log_every_n_steps=t.log_every_n_steps,
        num_sanity_val_steps=0,
        sync_batchnorm=False,  # VAEModule.setup converts batch norm itself (GlobalBatchNorm: any device)
        use_distributed_sampler=False,  # our samplers shard by (rank, world) themselves
        enable_progress_bar=progress,
        enable_model_summary=progress,
        callbacks=[RunCheckpoint(run_dir, t.checkpoint_every_n_epochs, t.save_best, t.checkpoint_every_n_steps),
                   *([SnapshotCheckpoint(run_dir, t.snapshot_steps)] if t.snapshot_steps else []),
                   *([_progress_bar()] if progress else []), *callbacks],
        plugins=[RunCheckpointIO()],
        logger=loggers or False,
        default_root_dir=str(run_dir),
        deterministic=False,
    )


def _quiet_lightning(progress: bool) -> None:
    import logging

    for pattern in (
        ".*does not have many workers.*",
        ".*smaller than the logging interval.*",
        ".*GPU available but not used.*",
        ".*`isinstance.treespec, LeafSpec.` is deprecated.*",
        ".*resuming from a checkpoint that ended before the epoch ended.*",  # ours resume mid-epoch exactly
    ):
        warnings.filterwarnings("ignore", pattern)
    if not progress:
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _is_launched_child() -> bool:
    """True in the extra processes the "ddp" (popen) strategy launches by re-running the command."""
    return os.environ.get(RUN_DIR_ENV) is not None and int(os.environ.get("LOCAL_RANK", "0")) > 0


def _save_sigint():
    import signal
    import threading

    return signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None


def _restore_sigint(handler) -> None:
    import signal

    if handler is not None:
        signal.signal(signal.SIGINT, handler)


def _run(cfg: RunConfig, run_dir: Path, splits, ckpt_path, progress: bool, callbacks) -> Path:
    _quiet_lightning(progress)
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    if splits is None:
        splits = load_splits(cfg)  # spawned processes load their own copy (the module never pickles its data)
    module = VAEModule(cfg, splits.shape, splits, run_dir)
    trainer = build_trainer(cfg, run_dir, progress, callbacks)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    sigint = _save_sigint()
    try:
        trainer.fit(module, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    except SystemExit:
        if not trainer.interrupted:  # Lightning turns Ctrl-C into sys.exit(1) after its graceful shutdown
            raise
    except Exception as err:
        # spawned processes report their exceptions as text: surface a NaN stop as the same error type
        if type(err).__name__ == "ProcessRaisedException" and NonFiniteLossError.__name__ in str(err):
            line = next(ln for ln in str(err).splitlines() if NonFiniteLossError.__name__ in ln)
            raise NonFiniteLossError(line.split(": ", 1)[-1]) from None
        raise
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
        _restore_sigint(sigint)  # Lightning ignores SIGINT after a Ctrl-C; give the caller its handler back
    if trainer.interrupted:
        raise TrainingInterrupted(
            f"training interrupted at global step {trainer.global_step} (epoch {trainer.current_epoch}); "
            f"continue with: arelbo train --resume {run_dir}"
        )
    if not _is_launched_child() and trainer.is_global_zero:
        _write_samples(run_dir, cfg.train.n_samples, cfg.train.seed)
    return run_dir


def _write_samples(run_dir: Path, n: int, seed: int) -> None:
    from arelbo.imagegrid import make_grid, save_png

    if n <= 0:
        return
    model, _, _ = runs.load_model(run_dir, "last")
    if len(model.shape) != 3 or model.shape[0] not in (1, 3) or min(model.shape[1:]) < 2:
        return  # not images (e.g. Gaussian vectors)
    g = torch.Generator().manual_seed(seed)
    save_png(make_grid(model.sample(n, generator=g)), run_dir / "samples.png")


def fit(cfg: RunConfig, run_dir=None, *, splits=None, progress: bool = True, callbacks: Sequence = (),
        prefix: str | None = None) -> Path:
    """Train a new run from ``cfg`` into ``run_dir`` (default: ``cfg.out_dir/cfg.name``); returns the run dir.

    Everything that can be checked is checked before the directory is created (:func:`prepare`); a directory
    left by a run that stopped before its first checkpoint is started again. The run directory is locked
    while training (:func:`arelbo.runs.run_lock`).
    ``splits``: an already loaded :class:`arelbo.data.Splits` (else loaded from ``cfg.data``).
    ``callbacks``: extra Lightning callbacks (tests use them to interrupt a run).
    """
    _check_precision(cfg.train)  # before a run directory is made
    if _is_launched_child():
        run_dir = Path(os.environ[RUN_DIR_ENV])
        return _run(RunConfig.load(run_dir / "config.yaml"), run_dir, splits, None, progress, callbacks)
    splits = prepare(cfg, splits)
    run_dir = new_run_dir(cfg, run_dir, prefix)
    run_dir.mkdir(parents=True, exist_ok=True)
    with runs.run_lock(run_dir):
        check_run_dir(run_dir)  # again, now that no other process can start here
        clear_early_files(run_dir)
        save_run_config(run_dir, cfg)
        return _run(cfg, run_dir, splits, None, progress, callbacks)


def _resume_path(run_dir: Path) -> Path:
    path = run_dir / runs.CHECKPOINT_DIR / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"nothing to resume in {run_dir}: no {runs.CHECKPOINT_DIR}/last.pt (the run stopped before its first "
            f"checkpoint); start it again with: arelbo train --config {run_dir / 'config.yaml'} --out {run_dir}"
        )
    return path


RESUMABLE_SECTIONS = ("train",)
# train.* settings a resume cannot apply to the restored state, with the reason (the others are applied)
NOT_RESUMABLE = {
    "seed": "the data order and noise of the steps already taken came from it",
    "optimizer": "the restored optimiser state belongs to the saved optimiser",
    "precision": "the restored state (and loss scaling) was trained at the saved precision",
}


# Settings of config.yaml that may differ from the checkpoint's on resume: where the data are now and how they are
# read (same data, same order), and train.* (applied to the restored state) but for NOT_RESUMABLE.
EDITABLE_ON_RESUME = ("data.root", "data.eval_batch_size", "data.options.mmap", "out_dir", "name")


def _differences(a, b, prefix: str = "") -> list[tuple[str, object, object]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in [*a, *(k for k in b if k not in a)]:
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [(prefix[:-1], a, b)]


def check_saved_config(saved: RunConfig, ckpt: dict, config_file: Path, ckpt_path: Path) -> None:
    """Refuse a ``config.yaml`` edited to disagree with the checkpoint it resumes (say model.latent_dim), naming
    the key and the file, before anything is built or written: the checkpoint's weights and state were made with
    its own config. Only :data:`EDITABLE_ON_RESUME` and train.* (but :data:`NOT_RESUMABLE`) may differ."""
    raw = ckpt.get("config")
    try:
        theirs = RunConfig.from_saved(raw, source=str(ckpt_path)).to_dict()
    except (ConfigError, TypeError):  # a checkpoint config this version cannot read: compare as stored
        theirs = dict(raw) if isinstance(raw, dict) else {}
    mine = saved.to_dict()
    their_train = theirs.pop("train", None)
    their_train = their_train if isinstance(their_train, dict) else {}
    diffs = [(f"train.{k}", getattr(saved.train, k), their_train[k]) for k in NOT_RESUMABLE
             if k in their_train and their_train[k] != getattr(saved.train, k)]
    mine.pop("train", None)
    diffs += [d for d in _differences(mine, theirs) if d[0] not in EDITABLE_ON_RESUME]
    if diffs:
        key, here, there = diffs[0]
        more = f" (and {len(diffs) - 1} more: {', '.join(d[0] for d in diffs[1:4])}{', ...' if len(diffs) > 4 else ''})" \
            if len(diffs) > 1 else ""
        raise ConfigError(
            f"{config_file} disagrees with the checkpoint it resumes ({ckpt_path}): {key} is {here!r} there but "
            f"{there!r} in the checkpoint{more}; set it back to {there!r} in {config_file} (nothing was written; "
            f"train a new run for another value)"
        )


def check_resume(saved: RunConfig, cfg: RunConfig, ckpt: dict, ckpt_path: Path) -> None:
    """Refuse a resume that could not do what ``cfg`` says, before anything is written."""
    for key, why in NOT_RESUMABLE.items():
        old, new = getattr(saved.train, key), getattr(cfg.train, key)
        if old != new:
            raise ConfigError(f"--set train.{key}={new}: cannot change when resuming ({why}); the run keeps "
                              f"{key}={old} (train a new run for another value)")
    mid_epoch = int(ckpt.get("epoch_batches_done", 0)) > 0
    if mid_epoch and saved.train.limit_train_batches != cfg.train.limit_train_batches:
        raise ConfigError("train.limit_train_batches cannot change when resuming from a checkpoint in the middle of "
                          "an epoch (the epoch's length is fixed); resume without it")
    if runs.training_finished(ckpt, cfg):
        step = int(ckpt.get("global_step", 0))
        raise ConfigError(
            f"nothing to resume: {ckpt_path} is at step {step} (epoch {ckpt.get('epoch')}), already the end for "
            f"train.epochs={cfg.train.epochs}, train.max_steps={cfg.train.max_steps}; raise train.epochs (or "
            f"train.max_steps) to train further"
        )


class _StartResumed(pl.Callback):
    """Record a resume once it really starts: the log forgets what came after the checkpoint, config.yaml
    takes the resumed settings (process 0 only)."""

    def __init__(self, run_dir: Path, cfg: RunConfig, step: int):
        self.run_dir, self.cfg, self.step = Path(run_dir), cfg, int(step)

    def on_train_start(self, trainer, module) -> None:
        if trainer.is_global_zero:
            truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
            save_run_config(self.run_dir, self.cfg)


def resume(run_dir, overrides: Sequence[str] = (), *, splits=None, progress: bool = True,
           callbacks: Sequence = ()) -> Path:
    """Continue the run in ``run_dir`` from ``checkpoints/last.pt`` exactly where it stopped (mid-epoch too),
    to the configured number of epochs or steps. ``overrides`` (``train.*`` only, e.g. ``train.epochs=20``,
    ``train.lr=1e-4``) are applied to the restored state, or refused (:data:`NOT_RESUMABLE`); config.yaml
    changes only once the resumed training starts."""
    from arelbo.config import apply_overrides, parse_override

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        if run_dir.exists():
            raise NotADirectoryError(f"cannot resume: {run_dir} is a file, not a run directory")
        raise FileNotFoundError(f"cannot resume: run directory {run_dir} does not exist")
    saved = runs.read_config(run_dir)
    for text in overrides:
        path, _ = parse_override(text)
        if path[0] not in RESUMABLE_SECTIONS:
            raise ConfigError(f"--set {text}: only train.* settings may change when resuming a run")
    cfg = RunConfig.from_dict(apply_overrides(saved.to_dict(), overrides)) if overrides else saved
    if _is_launched_child():  # a process the "ddp" launch started: the first process holds the lock and writes
        return _run(cfg, run_dir, splits, _resume_path(run_dir), progress, callbacks)
    with runs.run_lock(run_dir):
        ckpt_path = _resume_path(run_dir)
        ckpt = runs.load_checkpoint(ckpt_path)
        check_saved_config(saved, ckpt, run_dir / "config.yaml", ckpt_path)
        check_resume(saved, cfg, ckpt, ckpt_path)
        splits = prepare(cfg, splits)
        if list(splits.shape) != list(ckpt.get("data_shape", splits.shape)):
            raise ValueError(f"the data now have shape {tuple(splits.shape)}, the run was trained on "
                             f"{tuple(ckpt['data_shape'])}: check data.root in {run_dir / 'config.yaml'}")
        start = _StartResumed(run_dir, cfg, int(ckpt.get("global_step", 0)))
        return _run(cfg, run_dir, splits, ckpt_path, progress, [start, *callbacks])


class _StepTimer(pl.Callback):
    """Wall time from the start of step ``first`` to the end of step ``first + n - 1`` (data loading, logging and
    framework overhead between steps included)."""

    def __init__(self, first: int, n: int):
        self.first, self.n = first, n
        self.t0: float | None = None
        self.seconds: float | None = None

    @staticmethod
    def _now(module) -> float:
        if module.device.type == "cuda":  # count queued kernels in the steps that launched them
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.first:
            self.t0 = self._now(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.first + self.n and self.t0 is not None:  # global_step already incremented
            self.seconds = self._now(module) - self.t0


def benchmark_steps(cfg: RunConfig, splits, steps: int, warmup: int = 5) -> float:
    """Seconds per training step of this pipeline (Lightning loop, logging, NaN guard; no validation) on ``cfg``'s
    model, objective and batch size, timed over ``steps`` steps after ``warmup``; for benchmarks/bench_train.py."""
    import shutil
    import tempfile

    from arelbo.config import apply_overrides

    overrides = [f"train.max_steps={warmup + steps}", "train.epochs=1000", "train.limit_val_batches=0",
                 "train.n_samples=0", "name=null"]
    cfg = RunConfig.from_dict(apply_overrides(cfg.to_dict(), overrides))
    timer = _StepTimer(warmup, steps)
    tmp = Path(tempfile.mkdtemp(prefix="arelbo-bench-"))
    try:
        fit(cfg, tmp / "run", splits=splits, progress=False, callbacks=[timer])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if timer.seconds is None:
        raise RuntimeError(f"benchmark did not reach step {warmup + steps}")
    return timer.seconds / steps

