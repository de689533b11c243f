"""Speed features of the trainer and data: mixed precision, no host sync per step, device-resident and
memory-mapped data, channels-last and torch.compile. All on tiny problems on the CPU."""

import collections
import copy
import json
import math
import statistics
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("lightning")

from lightning.pytorch.callbacks import Callback  # noqa: E402

from arelbo import runs  # noqa: E402
from arelbo.config import ConfigError, load_config  # noqa: E402
from arelbo.data import is_mapped, load_dataset  # noqa: E402
from arelbo.objectives import POLICIES, GaussianVAELoss  # noqa: E402
from arelbo.train import NonFiniteLossError, fit, resume  # noqa: E402
from test_train import PoisonBatch  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

N_TRAIN, BATCH = 320, 32  # 10 steps per epoch
EIGENVALUES = [3, 2, 1, 0.5, 0.2, 0.1]


def tiny(*extra, policy="ar"):
    """The tiny MLP VAE on 6-d Gaussian data of tests/test_train.py."""
    return load_config("linear-gaussian", overrides=[
        f"objective.policy={policy}", "model.arch=mlp", "model.hidden=[16]", "model.latent_dim=3",
        "model.out_activation=none",
        f"data.options={{n_train: {N_TRAIN}, n_val: 96, n_test: 32, eigenvalues: {EIGENVALUES}}}",
        f"data.batch_size={BATCH}", "data.eval_batch_size=40", "train.schedule=none", "train.epochs=2",
        "train.log_every_n_steps=1", "train.accelerator=cpu", "train.n_samples=0", *extra,
    ])


def tiny_conv(*extra):
    """A two-layer conv VAE on 3x8x8 uint8 images (a folder dataset)."""
    return load_config("mnist-conv", overrides=[
        "model.hidden=[4, 8]", "model.latent_dim=2", "data.batch_size=8", "data.eval_batch_size=5",
        "train.epochs=2", "train.log_every_n_steps=3", "train.accelerator=cpu", "train.n_samples=0", *extra,
    ])


@pytest.fixture(scope="module")
def splits():
    return load_dataset("gaussian", n_train=N_TRAIN, n_val=96, n_test=32, eigenvalues=EIGENVALUES)


def write_images(folder, n, size, seed=0, fmt="PNG"):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.{fmt.lower()}", fmt)
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images") / "imgs", 60, 8)  # 48 train / 6 val / 6 test


def _params(run_dir):
    return runs.load_checkpoint(runs.checkpoint_path(run_dir, "last"))


def _assert_same_state(a, b):
    assert a["global_step"] == b["global_step"] and a["model"].keys() == b["model"].keys()
    for part in ("model", "objective"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), k


def _records(run_dir, split):
    return [r for r in runs.read_jsonl(run_dir / "metrics.jsonl") if r["split"] == split]


# --------------------------------------------------------------------------------------------------------------
# Mixed precision


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_loss_and_sigma2_statistics_are_float32_under_bf16_autocast(policy):
    from arelbo.models import build_model

    conditional = POLICIES[policy].needs_x_logvar  # sigma2(z) from the decoder's variance head
    cfg = tiny_conv(*([f"objective.policy={policy}", "model.variance_head=true"] if conditional else []))
    torch.manual_seed(0)
    model = build_model(cfg.model, (3, 8, 8))
    loss_fn = GaussianVAELoss(policy, check_finite=False)
    ref = copy.deepcopy(loss_fn)  # the same state (e.g. running sigma^2, step counts) for the float32 reference
    x = torch.rand(16, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        res = loss_fn(x, out.x_hat, out.mu, out.logvar, x_logvar=out.x_logvar)
    assert out.x_hat.dtype == torch.bfloat16 and out.mu.dtype == torch.bfloat16  # the network did run in bf16
    for name in ("loss", "distortion", "rate", "kl_per_dim", "sigma2", "neg_elbo", "bits_per_dim"):
        assert getattr(res, name).dtype == torch.float32, name
    # the same float32 arithmetic as outside autocast on the upcast network outputs: nothing inside the loss is
    # lowered to bf16
    expected = ref(x, out.x_hat.float(), out.mu.float(), out.logvar.float(),
                   x_logvar=None if out.x_logvar is None else out.x_logvar.float())
    for name in ("loss", "distortion", "rate", "sigma2", "neg_elbo"):
        assert torch.equal(getattr(res, name), getattr(expected, name)), name


def test_bf16_sigma2_trajectory_stays_close_to_float32(tmp_path, splits):
    """300 steps of the tiny MLP in float32 and in bf16-mixed from the same initialisation, noise and data order.

    Tolerance: 3 % relative at every logged step. bf16 keeps 8 significant bits (unit roundoff 2^-8 = 0.4 %); the
    network's matmuls round their operands to that while the loss and sigma^2 are float32 (see above), so sigma^2,
    a mean of 32 x 6 squared errors, moves by well under 0.4 % per step and the two runs drift apart only slowly.
    Measured: at most 0.5 % apart over the 300 steps. 3 % leaves 6x room for other CPUs' rounding, and is far
    below what a real difference does: another seed puts the trajectories a median 15 % apart (asserted, so the
    comparison can fail).
    """
    extra = ["train.epochs=30", "train.log_every_n_steps=10", "train.limit_val_batches=0", "train.lr=3e-3"]

    def trajectory(*more):
        run = fit(tiny(*extra, *more), tmp_path / "_".join(more or ("f32",)).replace("=", ""), splits=splits,
                  progress=False)
        return [r["sigma2"] for r in _records(run, "train")]

    s32, s16, other = trajectory(), trajectory("train.precision=bf16-mixed"), trajectory("train.seed=1")
    assert len(s32) == len(s16) == 30
    assert max(abs(a - b) / a for a, b in zip(s32, s16)) < 0.03
    assert statistics.median(abs(a - b) / a for a, b in zip(s32, other)) > 0.03


def test_16_mixed_is_refused_without_a_gpu(tmp_path, splits):
    with pytest.raises(ConfigError, match="16-mixed .* needs a CUDA GPU.*bf16-mixed"):
        fit(tiny("train.precision=16-mixed"), tmp_path / "fp16", splits=splits, progress=False)
    assert not (tmp_path / "fp16").exists()


# --------------------------------------------------------------------------------------------------------------
# No host sync on non-logging steps

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


class StepWindow(Callback):
    """Which training step the code now running belongs to: from its batch start to the next one's."""

    def __init__(self):
        self.step = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.step = trainer.global_step

    def on_train_end(self, trainer, module):
        self.step = None


@pytest.mark.parametrize("progress,policy,options", [
    (False, "ar", ()), (True, "ar", ()), (False, "ar-ema", ()), (False, "ar-annealed", ()), (False, "learned", ()),
    (False, "learned", ("objective.options.init_mle=true", "objective.options.log_sigma2_lr=0.01")),
])
def test_no_host_reads_on_non_logging_steps(tmp_path, splits, monkeypatch, progress, policy, options):
    """Count every read of a tensor's value to the host (item, tolist, bool, float, ...) made by the package or
    by Lightning, per training step: on a GPU each would wait for the device to finish its queued work. The
    policies with running state (ar-ema, ar-annealed) and a parameter (learned) update it without reading it."""
    window = StepWindow()
    reads = collections.Counter()

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if window.step is not None and ("/arelbo/" in caller or "lightning" in caller):
                reads[window.step] += 1
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    cfg = tiny("train.log_every_n_steps=4", "train.grad_clip=1.0", "train.schedule=cosine", *options, policy=policy)
    fit(cfg, tmp_path / "run", splits=splits, progress=progress, callbacks=[window])
    logging_steps = {0, 4, 8, 12, 16}
    epoch_ends = {9, 19}  # the epoch's validation and checkpoint run in its last step's window
    quiet = set(range(20)) - logging_steps - epoch_ends
    assert {s: reads[s] for s in quiet} == dict.fromkeys(quiet, 0)
    assert all(reads[s] > 0 for s in logging_steps)  # the counter does see the reads of logging steps


@pytest.mark.parametrize(("bad", "log_every", "detected"), [(13, 5, 15), (17, 50, 20)])
def test_nan_stop_names_the_first_bad_step_and_keeps_the_last_finite_checkpoint(tmp_path, splits, bad, log_every,
                                                                                  detected):
    """Checked on logging steps (13 -> found at step 15) and before validation and checkpoints (17 -> found when
    epoch 1 ends after step 19, i.e. at global step 20): the message names step 13 / 17 either way."""
    run_dir = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError) as err:
        fit(tiny("train.epochs=3", f"train.log_every_n_steps={log_every}"), run_dir, splits=splits, progress=False,
            callbacks=[PoisonBatch(bad)])
    msg = str(err.value)
    epoch, batch = divmod(bad, 10)
    assert f"at global step {bad} (epoch {epoch}, batch {batch})" in msg
    assert f"detected at step {detected}" in msg and "last.pt" in msg
    ckpt = _params(run_dir)
    assert ckpt["global_step"] == 10
    assert all(torch.isfinite(t).all() for part in ("model", "objective") for t in ckpt[part].values())
    assert all(math.isfinite(r["loss"]) for r in _records(run_dir, "train"))
    assert [r["epoch"] for r in _records(run_dir, "val")] == [0]  # epoch 1's NaN state was never validated


def test_nan_before_a_snapshot_step_writes_no_snapshot(tmp_path, splits):
    run_dir = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match="at global step 13 .*detected at step 15"):
        fit(tiny("train.epochs=3", "train.log_every_n_steps=50", "train.snapshot_steps=[12, 15]"), run_dir,
            splits=splits, progress=False, callbacks=[PoisonBatch(13)])
    assert sorted(p.name for p in (run_dir / runs.CHECKPOINT_DIR).iterdir()) == ["best.pt", "last.pt", "step-12.pt"]


# --------------------------------------------------------------------------------------------------------------
# Device-resident and memory-mapped data


class BatchKinds(Callback):
    def __init__(self):
        self.kinds = set()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.kinds.add((batch.dtype, tuple(batch.shape)))


def test_device_resident_data_trains_identically_and_resumes_exactly(tmp_path, image_folder):
    """train.data_on_device=true (forced on the CPU): the loader yields only indices, the module gathers the uint8
    samples it holds and converts them; same sampler, so the same run bit for bit, and exact resume."""
    data = load_dataset("folder", image_folder)
    plain = fit(tiny_conv(), tmp_path / "plain", splits=data, progress=False)
    kinds = BatchKinds()
    resident = fit(tiny_conv("train.data_on_device=true"), tmp_path / "resident", splits=data, progress=False,
                   callbacks=[kinds])
    assert kinds.kinds == {(torch.int64, (8,))}
    _assert_same_state(_params(plain), _params(resident))
    assert _records(plain, "val") == _records(resident, "val")
    half = fit(tiny_conv("train.data_on_device=true", "train.epochs=1"), tmp_path / "half", splits=data,
               progress=False)
    resume(half, ["train.epochs=2"], splits=data, progress=False)
    _assert_same_state(_params(plain), _params(half))


def test_memory_mapped_folder_matches_and_trains_identically(tmp_path, image_folder):
    cache = tmp_path / "cache"
    loaded = load_dataset("folder", image_folder, cache_dir=cache / "a")
    mapped = load_dataset("folder", image_folder, cache_dir=cache / "b", mmap=True)  # written chunk by chunk
    again = load_dataset("folder", image_folder, cache_dir=cache / "b", mmap=True)  # read back, mapped
    assert not loaded.info["cache_hit"] and not mapped.info["cache_hit"] and again.info["cache_hit"]
    assert (cache / "a").iterdir().__next__().read_bytes() == (cache / "b").iterdir().__next__().read_bytes()
    for split in ("train", "val", "test"):
        assert is_mapped(mapped.split(split)) and not is_mapped(loaded.split(split))
        assert loaded.split(split).is_contiguous()  # a fresh decode has the layout of a cached one
        assert torch.equal(mapped.split(split), loaded.split(split))
    plain = fit(tiny_conv(), tmp_path / "plain", splits=loaded, progress=False)
    half = fit(tiny_conv("train.epochs=1"), tmp_path / "half", splits=again, progress=False)
    resume(half, ["train.epochs=2"], splits=again, progress=False)
    _assert_same_state(_params(plain), _params(half))
    # streamed by worker processes (each maps the file and drops its pages per batch): the same batches in order
    workers = fit(tiny_conv("train.num_workers=2"), tmp_path / "workers", splits=again, progress=False)
    _assert_same_state(_params(plain), _params(workers))


def test_memory_mapped_refuses_without_a_writable_cache(tmp_path, image_folder, monkeypatch):
    from arelbo.data import DatasetError, images

    monkeypatch.setattr(images, "writable_dir", lambda d: False)
    with pytest.raises(DatasetError, match="mmap=True needs a writable cache directory"):
        load_dataset("folder", image_folder, cache_dir=tmp_path / "none", mmap=True)


RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch
    from torch.utils.data import DataLoader
    from arelbo.data import ImageTensorDataset, collate_identity, load_dataset
    from arelbo.train import EpochSampler

    def rss_mb():  # current resident set
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    root, cache, mmap = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    torch.zeros(1).sum()
    before = rss_mb()
    splits = load_dataset("folder", root, cache_dir=cache, mmap=mmap)
    loader = DataLoader(ImageTensorDataset(splits.train), batch_size=2, collate_fn=collate_identity,
                        sampler=EpochSampler(len(splits.train), 2, True, 0, True))
    total = sum(float(x.sum()) for x in loader)
    # the peak of this process's own memory (VmHWM, kB): ru_maxrss would not do, Linux keeps it across execve, so a
    # child of a large process (the test runner) starts with its parent's peak
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    print(json.dumps({"before_mb": before, "peak_mb": peak, "dataset_mb": splits.train.nbytes / 2**20 * 10 / 8,
                      "total": total}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
def test_memory_mapped_dataset_larger_than_the_limit_keeps_rss_bounded(tmp_path):
    """A 192 MB image folder (256 images of 512x512 RGB): with mmap=True, building the cache and one epoch of
    the training loader raise the peak resident memory by less than 64 MB (the limit); loaded into memory the
    same data raise it by more than the dataset's size (the control: the measure can fail)."""
    root = write_images(tmp_path / "big", 256, 512, fmt="BMP")
    out = {}
    for mmap in (True, False):
        proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(root), str(tmp_path / f"cache{int(mmap)}"),
                               str(int(mmap))], capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[mmap] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out[True]["total"] == out[False]["total"]  # the same pixels were read
    dataset_mb = out[True]["dataset_mb"]
    assert dataset_mb > 190
    assert out[True]["peak_mb"] - out[True]["before_mb"] < 64, out
    assert out[False]["peak_mb"] - out[False]["before_mb"] > dataset_mb, out


# --------------------------------------------------------------------------------------------------------------
# Optional speed switches


class WeightLayout(Callback):
    def __init__(self):
        self.channels_last = set()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        convs = [m for m in module.model.modules() if isinstance(m, torch.nn.Conv2d)]
        self.channels_last.update(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)


def _assert_same_training(a, b):
    """Same losses and validation -ELBO up to float rounding (parameters are not compared one by one: a conv bias
    before batch norm has zero gradient up to rounding, which Adam turns into full-size random steps)."""
    ta, tb = _records(a, "train"), _records(b, "train")
    assert [r["step"] for r in ta] == [r["step"] for r in tb] and len(ta) >= 2
    for ra, rb in zip(ta, tb):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4) and rb["sigma2"] == pytest.approx(ra["sigma2"], rel=1e-4)
    assert _records(b, "val")[-1]["neg_elbo"] == pytest.approx(_records(a, "val")[-1]["neg_elbo"], rel=1e-4)
    assert _params(a)["model"].keys() == _params(b)["model"].keys()  # parameter names of the plain model
    runs.load_model(b)  # an ordinary checkpoint


def test_channels_last_trains_the_same_model(tmp_path, image_folder):
    data = load_dataset("folder", image_folder)
    plain = fit(tiny_conv("train.epochs=1", "train.log_every_n_steps=1"), tmp_path / "plain", splits=data,
                progress=False)
    layout = WeightLayout()
    fast = fit(tiny_conv("train.epochs=1", "train.log_every_n_steps=1", "train.channels_last=true"), tmp_path / "cl",
               splits=data, progress=False, callbacks=[layout])
    assert layout.channels_last == {True}
    _assert_same_training(plain, fast)


@pytest.mark.slow
def test_compile_trains_the_same_model(tmp_path, image_folder):
    data = load_dataset("folder", image_folder)
    plain = fit(tiny_conv("train.epochs=1", "train.log_every_n_steps=1"), tmp_path / "plain", splits=data,
                progress=False)
    fast = fit(tiny_conv("train.epochs=1", "train.log_every_n_steps=1", "train.compile=true"), tmp_path / "compiled",
               splits=data, progress=False)
    _assert_same_training(plain, fast)


def test_training_without_tensorboard_warns_and_keeps_metrics(tmp_path, splits, monkeypatch):
    from arelbo.train import loop as train

    monkeypatch.setattr(train, "_tensorboard_available", lambda: False)
    with pytest.warns(UserWarning, match="TensorBoard events are not written"):
        run_dir = fit(tiny("train.epochs=1"), tmp_path / "run", splits=splits, progress=False)
    assert not (run_dir / "tensorboard").exists() and _records(run_dir, "val")


def test_speed_switches_are_off_by_default():
    t = load_config("mnist-conv").train
    assert (t.data_on_device, t.channels_last, t.compile, t.precision) == (None, False, False, "32")
