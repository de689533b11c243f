"""Training-speed benchmark: pipeline vs bare PyTorch loop, `ar` vs `fixed` step overhead, GFLOP/s vs peak, and
(``--priors``) the cost of a training step with each prior of ``model.prior``, or (``--presets``) the step of several
presets side by side (bare and through the pipeline), as ratios to the first.

The `ar` overhead is reported two ways: whole training steps of an `ar` and a `fixed` (sigma2 = 1) model
(two different models, so noisy on a shared machine), and the loss alone on identical tensors relative to a
step (the policy's own cost).

    python benchmarks/bench_train.py [--preset mnist-conv] [--steps 60] [--repeats 5] [--out docs/benchmarks.json]
    python benchmarks/bench_train.py --priors [--steps 40] [--repeats 5] [--out docs/bench_priors.json]
    python benchmarks/bench_train.py --presets mnist-conv,mnist-hvae [--steps 40] [--repeats 5] [--out ...]

Everything is measured in this one process, interleaved, and reported as medians of repeats and ratios of medians
(timings on a shared machine are noisy: compare only numbers from one run). Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from arelbo.config import load_config
from arelbo.data import load_dataset, to_float
from arelbo.models import build_model


def matmul_peak_gflops(n: int = 1024, repeats: int = 7) -> float:
    """Measured float32 matmul throughput: the practical compute ceiling of this machine."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        times.append((time.perf_counter() - t0) / 4)
    return 2 * n**3 / statistics.median(times) / 1e9


def make_step(cfg, shape, policy: str, sigma2: float = 1.0, prior: str | None = None):
    """A bare training step (the few lines a user would write around the library's loss) and the model it trains.
    With ``prior`` the model has that ``model.prior``; the rate is the prior's (closed form for N(0, I), the
    one-sample Monte-Carlo estimate otherwise), as in the training loop."""
    import dataclasses

    from arelbo.objectives import GaussianVAELoss

    torch.manual_seed(0)
    model = build_model(cfg.model if prior is None else dataclasses.replace(cfg.model, prior=prior), shape)
    kwargs = {"sigma2": sigma2} if policy == "fixed" else {}
    loss_fn = GaussianVAELoss(policy, check_finite=False, **kwargs)
    opt = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=cfg.train.lr)

    def step(x):
        loss = loss_fn(x, model(x)).loss  # the model's named output: its rate, every latent group
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step, model


def bench_priors(cfg, shape, batches, repeats: int) -> dict:
    """Seconds per `ar` step with each registered prior, interleaved (the order rotates every repeat); medians and
    their ratio to the standard prior's."""
    from arelbo.models.priors import PRIORS

    names = sorted(PRIORS, key=lambda n: (n != "standard", n))
    steps = {name: make_step(cfg, shape, "ar", prior=name)[0] for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            times[name].append(time_steps(steps[name], batches))
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "prior_step_ms": {name: 1e3 * m for name, m in med.items()},
        "prior_step_ms_per_repeat": {name: [1e3 * t for t in ts] for name, ts in times.items()},
        "prior_step_ratio_to_standard": {name: m / med["standard"] for name, m in med.items()},
    }


def bench_presets(names: list[str], steps: int, repeats: int) -> dict:
    """Seconds per `ar` step of each preset, bare and through the pipeline, interleaved (the order rotates every
    repeat); medians, and their ratios to the first preset's."""
    from arelbo.train import benchmark_steps

    setups = {}
    for name in names:
        cfg = load_config(preset=name)
        splits = load_dataset(cfg.data.name, cfg.data.root, **cfg.data.options)
        bs = cfg.data.batch_size
        batches = list(to_float(splits.train[: steps * bs]).split(bs))[:steps]
        step, model = make_step(cfg, splits.shape, "ar")
        setups[name] = (cfg, splits, batches, step, sum(p.numel() for p in model.parameters()))
    bare = {n: [] for n in names}
    pipe = {n: [] for n in names}
    for i in range(repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            cfg, splits, batches, step, _ = setups[name]
            bare[name].append(time_steps(step, batches))
            pipe[name].append(benchmark_steps(cfg, splits, steps))
    med = statistics.median
    first = names[0]
    return {
        "presets": names,
        "batch_size": {n: setups[n][0].data.batch_size for n in names},
        "parameters": {n: setups[n][4] for n in names},
        "bare_step_ms": {n: 1e3 * med(bare[n]) for n in names},
        "pipeline_step_ms": {n: 1e3 * med(pipe[n]) for n in names},
        "bare_step_ms_per_repeat": {n: [1e3 * v for v in bare[n]] for n in names},
        "pipeline_step_ms_per_repeat": {n: [1e3 * v for v in pipe[n]] for n in names},
        "bare_ratio_to_first": {n: med(bare[n]) / med(bare[first]) for n in names},
        "pipeline_ratio_to_first": {n: med(pipe[n]) / med(pipe[first]) for n in names},
        "gflop_per_step": {n: flops_per_step(setups[n][3], setups[n][2][0]) / 1e9 for n in names},
    }


def time_steps(step, batches) -> float:
    """Seconds per step over the given batches (after one warm-up step)."""
    step(batches[0])
    t0 = time.perf_counter()
    for x in batches:
        step(x)
    return (time.perf_counter() - t0) / len(batches)


def loss_seconds(policy: str, x, repeats: int = 50) -> float:
    """Forward + backward of the loss alone on fixed tensors: the cost of the policy itself, free of the
    training dynamics (a collapsed sigma2 = 1 run computes on different numbers than an ar run)."""
    from arelbo.objectives import GaussianVAELoss

    loss_fn = GaussianVAELoss(policy, check_finite=False)
    x_hat = torch.rand_like(x).requires_grad_(True)
    mu = torch.randn(x.shape[0], 16, requires_grad=True)
    logvar = torch.randn(x.shape[0], 16, requires_grad=True)
    loss_fn(x, x_hat, mu, logvar).loss.backward()
    t0 = time.perf_counter()
    for _ in range(repeats):
        loss_fn(x, x_hat, mu, logvar).loss.backward()
    return (time.perf_counter() - t0) / repeats


def flops_per_step(step, x) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(x)
    return counter.get_total_flops()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mnist-conv")
    parser.add_argument("--steps", type=int, default=60, help="training steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--priors", action="store_true",
                        help="time an `ar` training step with each prior of model.prior instead")
    parser.add_argument("--presets", default=None, metavar="A,B,...",
                        help="time the `ar` step of these presets side by side instead (ratios to the first)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.presets:
        names = [n.strip() for n in args.presets.split(",") if n.strip()]
        results = {"steps": args.steps, "repeats": args.repeats, "load_average_start": os.getloadavg()}
        results.update(bench_presets(names, args.steps, args.repeats))
        return _finish(results, args.out)

    cfg = load_config(preset=args.preset)
    splits = load_dataset(cfg.data.name, cfg.data.root, **cfg.data.options)
    bs = cfg.data.batch_size
    n = args.steps * bs
    data = to_float(splits.train[:n])
    batches = list(data.split(bs))[: args.steps]

    results = {"preset": args.preset, "batch_size": bs, "steps": args.steps, "repeats": args.repeats,
               "load_average_start": os.getloadavg()}
    if args.priors:
        results.update(bench_priors(cfg, splits.shape, batches, args.repeats))
        return _finish(results, args.out)
    bare_ar, bare_fixed, pipeline = [], [], []
    steps = {name: make_step(cfg, splits.shape, name)[0] for name in ("ar", "fixed")}
    pipeline_fn = _pipeline_runner(cfg, splits, args.steps)
    loss_ar, loss_fixed = [], []
    for i in range(args.repeats):  # interleaved, order alternating, so drifts in machine load hit all alike
        order = ("ar", "fixed") if i % 2 == 0 else ("fixed", "ar")
        for name in order:
            (bare_ar if name == "ar" else bare_fixed).append(time_steps(steps[name], batches))
            (loss_ar if name == "ar" else loss_fixed).append(loss_seconds(name, batches[0]))
        if pipeline_fn is not None:
            pipeline.append(pipeline_fn())

    med = statistics.median
    results["bare_ar_images_per_s"] = bs / med(bare_ar)
    results["bare_fixed_images_per_s"] = bs / med(bare_fixed)
    results["ar_overhead_vs_fixed"] = med(bare_ar) / med(bare_fixed) - 1
    results["ar_overhead_vs_fixed_per_repeat"] = [a / f - 1 for a, f in zip(bare_ar, bare_fixed)]
    # What ar itself adds to a step: its loss's extra time over fixed's, relative to a whole training step.
    results["loss_ms_ar"] = 1e3 * med(loss_ar)
    results["loss_ms_fixed"] = 1e3 * med(loss_fixed)
    results["ar_loss_overhead_fraction_of_step"] = (med(loss_ar) - med(loss_fixed)) / med(bare_fixed)
    if pipeline:
        results["pipeline_images_per_s"] = bs / med(pipeline)
        results["pipeline_vs_bare"] = med(bare_ar) / med(pipeline)
    flops = flops_per_step(steps["ar"], batches[0])
    results["gflop_per_step"] = flops / 1e9
    results["achieved_gflops"] = flops / med(bare_ar) / 1e9
    results["matmul_peak_gflops"] = matmul_peak_gflops()
    results["fraction_of_peak"] = results["achieved_gflops"] / results["matmul_peak_gflops"]
    return _finish(results, args.out)


def _finish(results: dict, out: str | None) -> dict:
    """Add the machine's description, print, and write ``out`` (JSON) when given."""
    results["torch"] = torch.__version__
    results["threads"] = torch.get_num_threads()
    results["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    results["load_average_end"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
    return results


def _pipeline_runner(cfg, splits, steps):
    """Seconds per step of the real pipeline (arelbo.train) on the same model, data and batch size."""
    try:
        from arelbo.train import benchmark_steps  # noqa: F401
    except ImportError:
        return None

    def run() -> float:
        return benchmark_steps(cfg, splits, steps)

    return run


if __name__ == "__main__":
    main()
