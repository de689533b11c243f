"""Device benchmark: training throughput, fraction of matmul peak, CelebA epoch time and evaluation time.

Runs on whatever device is present (CUDA if available, else CPU), on generated data of MNIST shape (1x28x28) and
CelebA shape (3x64x64), so it needs no download:

    PYTHONPATH=src python benchmarks/bench_device.py --out bench.json        # full form (GPU: < 3 minutes)
    PYTHONPATH=src python benchmarks/bench_device.py --tiny --out bench.json # smoke test (CPU: < 2 minutes)

What it measures (medians of repeats, after warm-up steps; on CUDA every timing is bracketed by a synchronize):

* ``peak``: measured square-matmul throughput in float32 (with the matmul precision torch uses by default, and
  with TF32 where CUDA offers it) and bfloat16: the practical compute ceiling of the device.
* ``bare``: images/s of a bare training step (the library's model and AR-ELBO loss, Adam; uint8 data resident
  on the device, gathered and converted per batch) for ``mnist-conv`` and ``celeba64-conv`` at several batch
  sizes, float32 and bf16 autocast, with FLOPs per step (``torch.utils.flop_counter``) and the fraction of the
  matching peak (bf16 steps against the bf16 peak; float32 steps against the float32 peak, or on CUDA, where
  cuDNN runs float32 convolutions in TF32 by default, against the TF32 peak, with the strict float32 fraction too).
* ``pipeline``: images/s of the real training pipeline (``arelbo.train``: Lightning loop, logging, NaN guard,
  data loading) at each preset's batch size, float32 and bf16, and its ratio to the bare step; on an accelerator
  also ``celeba64-conv`` bf16 with ``train.data_on_device=false`` (a host-to-device copy per batch) for comparison.
* ``switches``: ``train.channels_last`` and ``train.compile`` (torch.compile) on the bare ``celeba64-conv`` step.
* ``celeba_epoch``: seconds for one epoch of CelebA's 162,770 training images, extrapolated from the measured
  images/s (pipeline and bare, both precisions).
* ``eval``: time for 10,000 samples: decode them from an ``mnist-conv`` model, FID features of the 10,000
  samples and of 10,000 reference images with the committed ``mnist-features`` network, and the FID itself.

A time budget (``--budget-s``) skips the optional parts (switches, larger batch sizes) that would overrun it; what
was skipped is listed in the output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a source tree without install

from arelbo.config import load_config
from arelbo.data import Splits, to_float
from arelbo.models import build_model

CELEBA_TRAIN_IMAGES = 162_770
SHAPES = {"mnist-conv": (1, 28, 28), "mnist-hvae": (1, 28, 28), "celeba64-conv": (3, 64, 64)}
FULL = {
    "batch_sizes": {"mnist-conv": [128, 512, 2048], "mnist-hvae": [128, 512], "celeba64-conv": [64, 256, 1024]},
    "steps": 30, "warmup": 5, "repeats": 3, "pipeline_steps": 60, "eval_n": 10_000, "eval_repeats": 3,
    "matmul_n": {"cuda": 8192, "cpu": 1024}, "switch_batch": 64, "compile": True,
}
TINY = {
    "batch_sizes": {"mnist-conv": [32], "mnist-hvae": [8], "celeba64-conv": [8]},
    "steps": 3, "warmup": 1, "repeats": 1, "pipeline_steps": 3, "eval_n": 1000, "eval_repeats": 1,
    "matmul_n": {"cuda": 2048, "cpu": 256}, "switch_batch": 8, "compile": False,
}


class Clock:
    """Wall time with the device drained first, so queued kernels are counted where they belong."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, clock: Clock, repeats: int = 5,
                inner: int = 10) -> float:
    """Median TFLOP/s of an n x n matmul in ``dtype`` on ``device``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = clock()
        for _ in range(inner):
            torch.mm(a, b)
        times.append((clock() - t0) / inner)
    return 2 * n**3 / statistics.median(times) / 1e12


def measure_peaks(device: torch.device, n: int, clock: Clock) -> dict:
    out = {"n": n, "float32_matmul_precision": torch.get_float32_matmul_precision()}
    out["float32_tflops"] = matmul_peak(device, torch.float32, n, clock)
    if device.type == "cuda":
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            out["tf32_tflops"] = matmul_peak(device, torch.float32, n, clock)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    out["bf16_tflops"] = matmul_peak(device, torch.bfloat16, n, clock)
    return out


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_bare_step(preset: str, device: torch.device, precision: str, channels_last: bool = False,
                   compile_model: bool = False, compile_mode: str | None = None, fused: bool = False):
    """A bare training step of ``preset``'s model and objective: what a user would write around the library.
    ``fused``: Adam's update as one fused kernel; ``compile_mode``: torch.compile's mode (``reduce-overhead``:
    CUDA graphs, one launch for the captured forward)."""
    from arelbo.objectives import GaussianVAELoss

    cfg = load_config(preset=preset)
    torch.manual_seed(0)
    model = build_model(cfg.model, SHAPES[preset]).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = GaussianVAELoss(cfg.objective.policy, check_finite=False).to(device)
    opt = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=cfg.train.lr,
                           **({"fused": True} if fused else {}))
    forward = torch.compile(model, mode=compile_mode) if compile_model else model

    def step(x: torch.Tensor) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            out = forward(x)
            loss = loss_fn(x, out).loss  # the model's named output: every architecture, its own rate
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def generated_uint8(shape, n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8).to(device)


def time_bare(step, data: torch.Tensor, batch_size: int, steps: int, warmup: int, repeats: int,
              clock: Clock) -> list[float]:
    """Seconds per step, one value per repeat; each step gathers a batch from the device-resident uint8 data."""
    g = torch.Generator(device=data.device).manual_seed(0)

    def run(k: int) -> None:
        for _ in range(k):
            idx = torch.randint(0, data.shape[0], (batch_size,), device=data.device, generator=g)
            step(to_float(data[idx]))

    run(warmup)
    times = []
    for _ in range(repeats):
        t0 = clock()
        run(steps)
        times.append((clock() - t0) / steps)
    return times


def flops_per_step(step, data: torch.Tensor, batch_size: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(to_float(data[:batch_size]))
    return counter.get_total_flops()


def generated_splits(preset: str, n_train: int, seed: int = 0) -> Splits:
    shape = SHAPES[preset]
    n_val = 64
    x = generated_uint8(shape, n_train + 2 * n_val, torch.device("cpu"), seed)
    return Splits(name=f"generated-{preset}", train=x[:n_train], val=x[n_train:n_train + n_val],
                  test=x[n_train + n_val:])


def pipeline_seconds(preset: str, device: torch.device, precision: str, steps: int, warmup: int,
                     **train: object) -> float:
    from arelbo.config import RunConfig
    from arelbo.train import benchmark_steps

    d = load_config(preset=preset).to_dict()
    d["train"]["precision"] = "bf16-mixed" if precision == "bf16" else "32"
    d["train"]["accelerator"] = "gpu" if device.type == "cuda" else "cpu"
    d["train"].update(train)
    cfg = RunConfig.from_dict(d)
    splits = generated_splits(preset, cfg.data.batch_size * (steps + warmup + 1))
    return benchmark_steps(cfg, splits, steps, warmup=warmup)


def eval_seconds(device: torch.device, n: int, clock: Clock, batch_size: int = 1000) -> dict:
    """Decode n prior samples of an mnist-conv model, featurise them and n reference images, compute the FID."""
    from arelbo.metrics.features import get_feature_net
    from arelbo.metrics.fid import featurize, fid_from_features

    cfg = load_config(preset="mnist-conv")
    torch.manual_seed(0)
    model = build_model(cfg.model, SHAPES["mnist-conv"]).to(device).eval()
    net = get_feature_net("mnist-features")[0].to(device)
    reference = generated_uint8(SHAPES["mnist-conv"], n, device, seed=1)
    t0 = clock()
    with torch.inference_mode():
        g = torch.Generator(device=device).manual_seed(0)
        samples = torch.cat([
            model.decode(torch.randn(min(batch_size, n - i), model.latent_dim, device=device, generator=g))
            for i in range(0, n, batch_size)
        ])
    t1 = clock()
    gen_feats = featurize(samples, net, batch_size=batch_size)
    t2 = clock()
    ref_feats = featurize(reference, net, batch_size=batch_size)
    t3 = clock()
    fid = fid_from_features(gen_feats, ref_feats)
    t4 = clock()
    return {"decode_s": t1 - t0, "features_generated_s": t2 - t1, "features_reference_s": t3 - t2,
            "fid_s": t4 - t3, "total_s": t4 - t0, "fid": fid}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA if available) | cpu | cuda | cuda:N")
    parser.add_argument("--tiny", action="store_true", help="a quick smoke test (small sizes, one repeat)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip optional parts once this many seconds have passed (default: 150, tiny: 100)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile measurement (the tiny form always skips it)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's; 1 with --tiny)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads or args.tiny:
        # the smoke test: one thread, tiny tensors gain nothing from more, and on a shared machine they contend
        torch.set_num_threads(args.threads or 1)
    start = time.perf_counter()
    plan = TINY if args.tiny else FULL
    budget = args.budget_s if args.budget_s is not None else (100.0 if args.tiny else 150.0)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    clock = Clock(device)
    elapsed = lambda: time.perf_counter() - start
    med = statistics.median

    results: dict = {
        "form": "tiny" if args.tiny else "full",
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg(),
        "plan": {k: v for k, v in plan.items()},
        "skipped": [],
    }

    def log(msg: str) -> None:
        print(f"[{elapsed():6.1f} s] {msg}", flush=True)

    peaks = measure_peaks(device, plan["matmul_n"]["cuda" if device.type == "cuda" else "cpu"], clock)
    results["peak"] = peaks
    log(f"matmul peak: {json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in peaks.items()})}")
    # float32 convolutions run on TF32 tensor cores when cuDNN allows it (torch's default), so a float32 step is
    # measured against the TF32 peak there; its fraction of the strict float32 peak is reported beside it
    tf32_convs = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    peak_tflops = {"fp32": peaks["tf32_tflops"] if tf32_convs else peaks["float32_tflops"],
                   "bf16": peaks["bf16_tflops"]}
    results["fp32_steps_measured_against"] = "tf32_tflops" if tf32_convs else "float32_tflops"

    # ---- bare steps
    bare = []
    for preset, sizes in plan["batch_sizes"].items():
        for i, bs in enumerate(sizes):
            if i > 0 and elapsed() > 0.4 * budget:
                results["skipped"].append(f"bare {preset} batch {bs} (time budget)")
                continue
            data = generated_uint8(SHAPES[preset], max(4 * bs, 1024), device)
            flops = None
            for precision in ("fp32", "bf16"):
                step = make_bare_step(preset, device, precision)
                if flops is None:
                    flops = flops_per_step(step, data, bs)
                times = time_bare(step, data, bs, plan["steps"], plan["warmup"], plan["repeats"], clock)
                s = med(times)
                row = {"preset": preset, "batch_size": bs, "precision": precision, "images_per_s": bs / s,
                       "ms_per_step": 1e3 * s, "ms_per_step_repeats": [round(1e3 * t, 3) for t in times],
                       "gflop_per_step": flops / 1e9, "achieved_tflops": flops / s / 1e12}
                row["fraction_of_peak"] = row["achieved_tflops"] / peak_tflops[precision]
                if precision == "fp32" and tf32_convs:
                    row["fraction_of_strict_float32_peak"] = row["achieved_tflops"] / peaks["float32_tflops"]
                bare.append(row)
                log(f"bare {preset} bs={bs} {precision}: {row['images_per_s']:.0f} img/s, "
                    f"{row['achieved_tflops']:.3g} TFLOP/s = {100 * row['fraction_of_peak']:.1f}% of peak")
            del data
    results["bare"] = bare

    # ---- the pipeline at each preset's batch size
    pipeline = []
    for preset in plan["batch_sizes"]:
        bs = load_config(preset=preset).data.batch_size
        for precision in ("fp32", "bf16"):
            if args.tiny and (preset, precision) == ("celeba64-conv", "bf16"):
                continue  # the tiny form checks each code path once
            if elapsed() > 0.8 * budget:
                results["skipped"].append(f"pipeline {preset} {precision} (time budget)")
                continue
            try:
                s = pipeline_seconds(preset, device, precision, plan["pipeline_steps"], plan["warmup"])
            except Exception as err:  # noqa: BLE001  (report it and measure the rest)
                results["skipped"].append(f"pipeline {preset} {precision}: {type(err).__name__}: {err}"[:300])
                continue
            row = {"preset": preset, "batch_size": bs, "precision": precision, "images_per_s": bs / s,
                   "ms_per_step": 1e3 * s}
            ref = [r for r in bare if (r["preset"], r["batch_size"], r["precision"]) == (preset, bs, precision)]
            if ref:
                row["pipeline_vs_bare"] = row["images_per_s"] / ref[0]["images_per_s"]
            pipeline.append(row)
            log(f"pipeline {preset} bs={bs} {precision}: {row['images_per_s']:.0f} img/s"
                + (f" ({row['pipeline_vs_bare']:.3f} of bare)" if ref else ""))
    preset = "mnist-conv"  # the launch-bound model: the pipeline with train.fused_optimizer (one update kernel)
    for precision in ("fp32",) if device.type == "cpu" else ("fp32", "bf16"):
        if elapsed() > 0.8 * budget:
            results["skipped"].append(f"pipeline {preset} {precision} fused_optimizer (time budget)")
            continue
        bs = load_config(preset=preset).data.batch_size
        s = pipeline_seconds(preset, device, precision, plan["pipeline_steps"], plan["warmup"], fused_optimizer=True)
        row = {"preset": preset, "batch_size": bs, "precision": precision, "fused_optimizer": True,
               "images_per_s": bs / s, "ms_per_step": 1e3 * s}
        ref = [r for r in bare if (r["preset"], r["batch_size"], r["precision"]) == (preset, bs, precision)]
        if ref:
            row["pipeline_vs_bare"] = row["images_per_s"] / ref[0]["images_per_s"]
        pipeline.append(row)
        log(f"pipeline {preset} bs={bs} {precision} fused_optimizer: {row['images_per_s']:.0f} img/s")
    if device.type != "cpu":  # what device-resident data save: the same run copying each batch from the host
        preset, precision = "celeba64-conv", "bf16"
        if elapsed() > 0.5 * budget:
            results["skipped"].append("pipeline with train.data_on_device=false (time budget)")
        else:
            s = pipeline_seconds(preset, device, precision, plan["pipeline_steps"], plan["warmup"],
                                 data_on_device=False)
            bs = load_config(preset=preset).data.batch_size
            row = {"preset": preset, "batch_size": bs, "precision": precision, "data_on_device": False,
                   "images_per_s": bs / s, "ms_per_step": 1e3 * s}
            resident = [r for r in pipeline if (r["preset"], r["precision"]) == (preset, precision)]
            if resident:
                row["resident_speedup"] = resident[0]["images_per_s"] / row["images_per_s"]
            pipeline.append(row)
            log(f"pipeline {preset} bs={bs} {precision} data_on_device=false: {row['images_per_s']:.0f} img/s"
                + (f" (resident data: x{row['resident_speedup']:.3f})" if resident else ""))
    results["pipeline"] = pipeline

    # ---- optional speed switches on the CelebA net
    switches = []
    variants = [("celeba64-conv", plan["switch_batch"], "channels_last", {"channels_last": True}),
                ("celeba64-conv", plan["switch_batch"], "fused_adam", {"fused": True}),
                ("mnist-conv", plan["batch_sizes"]["mnist-conv"][0], "fused_adam", {"fused": True})]
    if plan["compile"] and not args.no_compile:
        variants.append(("celeba64-conv", plan["switch_batch"], "compile", {"compile_model": True}))
        if device.type == "cuda":  # CUDA graphs: the launch-bound small model is where they should pay
            variants += [(preset, plan["batch_sizes"][preset][0], "compile_reduce_overhead+fused_adam",
                          {"compile_model": True, "compile_mode": "reduce-overhead", "fused": True})
                         for preset in ("mnist-conv", "celeba64-conv")]
    for preset, bs, name, kwargs in variants:
        if elapsed() > (0.5 if "compile" in name else 0.6) * budget:  # compiling alone can take a minute
            results["skipped"].append(f"switch {name} {preset} (time budget)")
            continue
        data = generated_uint8(SHAPES[preset], max(4 * bs, 1024), device)
        precision = "bf16" if device.type == "cuda" else "fp32"
        try:
            step = make_bare_step(preset, device, precision, **kwargs)
            times = time_bare(step, data, bs, plan["steps"], plan["warmup"] + 2, plan["repeats"], clock)
        except Exception as err:  # noqa: BLE001  (e.g. torch.compile without a working compiler toolchain)
            results["skipped"].append(f"switch {name}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            continue
        base = [r for r in bare if (r["preset"], r["batch_size"], r["precision"]) == (preset, bs, precision)]
        row = {"switch": name, "preset": preset, "batch_size": bs, "precision": precision,
               "images_per_s": bs / med(times), "ms_per_step_repeats": [round(1e3 * t, 3) for t in times]}
        if base:
            row["speedup_vs_plain"] = row["images_per_s"] / base[0]["images_per_s"]
        switches.append(row)
        log(f"switch {name} {preset} bs={bs} {precision}: {row['images_per_s']:.0f} img/s"
            + (f" (x{row['speedup_vs_plain']:.3f})" if base else ""))
        del data
    results["switches"] = switches
    for row in pipeline:  # the fused pipeline against the fused bare step, where both were measured
        twin = [r for r in switches if r["switch"] == "fused_adam" and row.get("fused_optimizer")
                and (r["preset"], r["batch_size"], r["precision"]) == (row["preset"], row["batch_size"], row["precision"])]
        if twin:
            row["pipeline_vs_bare_fused"] = row["images_per_s"] / twin[0]["images_per_s"]

    # ---- one CelebA epoch, extrapolated
    epoch = {}
    for row in pipeline:
        if row["preset"] == "celeba64-conv" and row.get("data_on_device", True):
            epoch[f"pipeline_bs{row['batch_size']}_{row['precision']}_s"] = CELEBA_TRAIN_IMAGES / row["images_per_s"]
    for precision in ("fp32", "bf16"):
        rows = [r for r in bare if r["preset"] == "celeba64-conv" and r["precision"] == precision]
        if rows:
            best = max(rows, key=lambda r: r["images_per_s"])
            epoch[f"bare_best_{precision}_s"] = CELEBA_TRAIN_IMAGES / best["images_per_s"]
            epoch[f"bare_best_{precision}_batch_size"] = best["batch_size"]
    results["celeba_epoch"] = {"images": CELEBA_TRAIN_IMAGES, **epoch}
    log(f"CelebA epoch: {json.dumps({k: round(v, 1) for k, v in epoch.items()})}")

    # ---- evaluation of 10k samples
    try:
        runs_ = [eval_seconds(device, plan["eval_n"], clock) for _ in range(plan["eval_repeats"])]
    except Exception as err:  # noqa: BLE001  (report it; the training figures above still count)
        results["skipped"].append(f"eval: {type(err).__name__}: {err}"[:300])
    else:
        median_run = sorted(runs_, key=lambda r: r["total_s"])[len(runs_) // 2]
        results["eval"] = {"n_samples": plan["eval_n"], "repeats": len(runs_),
                           "total_s_all": [round(r["total_s"], 3) for r in runs_], **median_run}
        log(f"eval of {plan['eval_n']} samples: {median_run['total_s']:.2f} s (median of {len(runs_)})")

    results["load_average_end"] = os.getloadavg()
    results["wall_s"] = elapsed()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
