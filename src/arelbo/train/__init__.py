"""Training: a Lightning module around (VAE, GaussianVAELoss), built from a :class:`arelbo.config.RunConfig`.

This is the only package of arelbo that imports a training framework (one concern per module: ``data`` the
data order, ``module`` the Lightning module, ``checkpoints`` checkpoint IO and callbacks, ``rundir`` run directories,
``loop`` fit/resume). What it adds to the pure-PyTorch core:

* **Logging.** Every ``train.log_every_n_steps`` steps: loss, mse (distortion / D), distortion (per-sample sum of
  squared errors), rate (KL), sigma2, -ELBO and lr. Every epoch on the validation set: -ELBO in nats and bits/dim,
  mse, KL and KL per latent dimension (standard prior; a learnable prior's KL is its one-sample Monte-Carlo
  estimate and has no per-dimension split), active units (Cov_x(mu_j) > 0.01) and the sigma2 the -ELBO used: the
  policy's own held-out rule (:meth:`arelbo.objectives.DecoderVariance.held_out_sigma2`, e.g. ``ar`` the MLE on
  the whole validation set, ``fixed`` its constant), through the same :class:`arelbo.metrics.ELBOAccumulator` as
  ``arelbo eval``. Records go to ``metrics.jsonl`` (one JSON object
  per line with ``split``, ``step``, ``epoch``) and to TensorBoard (``tensorboard/``), values averaged over
  processes.
* **Checkpoints** in the package's own format (:mod:`arelbo.runs`: atomic writes, ``torch.load(weights_only=True)``,
  ``runs.load_model(run_dir)``): ``checkpoints/last.pt`` every N epochs and at the end, ``checkpoints/best.pt`` by
  validation -ELBO, and ``checkpoints/step-<N>.pt`` at each of ``train.snapshot_steps``. They carry Lightning's loop/optimiser/scheduler state plus the objective's state and every RNG.
* **Exact resume** (:func:`resume`): the data order is a function of (seed, epoch) only, the reparameterisation
  noise comes from the restored global RNG, validation noise from its own (seed, epoch) generator, so
  "2 epochs" and "1 epoch, stop, resume to 2" give identical parameters.
* **Data parallel** (``train.devices > 1``): ``data.batch_size`` is the global batch. Each process takes its
  contiguous slice of every global batch and the slice of the global batch's noise, so together with the ``ar``
  policies' all-reduced sums, DDP training reproduces single-process training on the same global batch
  (up to float summation order). Batch norm uses the global batch's statistics
  (:class:`arelbo.models.batchnorm.GlobalBatchNorm`, any device) unless ``train.sync_batchnorm`` is false.
* **NaN/inf guard** without a host sync per step: every step records, on the device, the first non-finite loss;
  the record is read on logging steps, before validation and before every checkpoint
  (:meth:`VAEModule.check_finite`), which raises :class:`NonFiniteLossError` naming the step and epoch of the
  first bad loss. So the stop may come a few steps late, but ``last.pt`` is always the last finite state.
* **Speed**: in-memory data live on the accelerator (uint8, copied once; each batch is an index gather and a
  conversion there), so no batch is copied from the host; memory-mapped datasets stream through the
  DataLoader (workers, pinned memory). Optional ``train.channels_last`` and ``train.compile``.
"""

from arelbo.train.data import EpochSampler, load_splits
from arelbo.train.errors import NonFiniteLossError, TrainingInterrupted
from arelbo.train.loop import benchmark_steps, fit, resume
from arelbo.train.module import VAEModule
from arelbo.train.rundir import new_run_dir

__all__ = [
    "VAEModule",
    "NonFiniteLossError",
    "TrainingInterrupted",
    "EpochSampler",
    "fit",
    "resume",
    "new_run_dir",
    "load_splits",
    "benchmark_steps",
]
