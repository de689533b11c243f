"""``arelbo features train``: train the MNIST feature network used for the project's FID (``mnist-features``).

Writes a plain state_dict (``torch.load(..., weights_only=True)``) and, next to it, a JSON provenance file:
the command, seed, data split, accuracies, sha256 of the weights file, torch version.
``arelbo features info`` prints the provenance of the committed weights.
"""

from __future__ import annotations

import argparse
import shlex
import sys

DEFAULT_OUT = "src/arelbo/weights/mnist_features.pt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="features_command", metavar="ACTION")
    train = sub.add_parser("train", help="train the mnist-features classifier on the MNIST training split",
                           description="Train the mnist-features classifier (55k MNIST training images, seeded, "
                                       "deterministic) and write its weights and provenance JSON.")
    train.add_argument("--epochs", type=int, default=4, help="training epochs (default: 4)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    train.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    train.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the one-cycle schedule")
    train.add_argument("--data-root", default=None, help="where MNIST is (default: the bundled offline copy)")
    train.add_argument("--min-accuracy", type=float, default=0.99,
                       help="refuse to write weights whose test accuracy is below this (default: 0.99)")
    train.add_argument("--out", default=DEFAULT_OUT, help=f"weights file to write (default: {DEFAULT_OUT}); "
                                                          "the provenance goes to the same name with .json")
    info = sub.add_parser("info", help="print the provenance of the committed mnist-features weights")
    info.add_argument("--weights", default=None, help="weights file (default: the committed one)")


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "features_command", None)
    if action == "train":
        return _train(args)
    if action == "info":
        return _info(args)
    print("usage: arelbo features {train,info} ...", file=sys.stderr)
    return 2


def _train(args: argparse.Namespace) -> int:
    import io
    import json
    import platform
    from pathlib import Path

    import torch

    from arelbo.data import load_dataset
    from arelbo.metrics.features import sha256_file, train_mnist_features
    from arelbo.fileio import atomic_write_bytes, atomic_write_text

    if args.epochs < 1:
        raise ValueError("--epochs must be >= 1")
    splits = load_dataset("mnist", args.data_root)
    print(f"training mnist-features on {len(splits.train)} MNIST training images "
          f"(epochs={args.epochs}, seed={args.seed}, torch threads={torch.get_num_threads()})", flush=True)
    net, report = train_mnist_features(epochs=args.epochs, seed=args.seed, batch_size=args.batch_size,
                                       lr=args.lr, splits=splits, log=lambda m: print(m, flush=True))
    print(f"test accuracy {report['test_accuracy']:.4f} ({len(splits.test)} images), "
          f"trained in {report['train_seconds']:.0f} s")
    if report["test_accuracy"] < args.min_accuracy:
        print(f"test accuracy {report['test_accuracy']:.4f} < --min-accuracy {args.min_accuracy}: "
              f"nothing written", file=sys.stderr)
        return 1
    out = Path(args.out)
    buffer = io.BytesIO()
    torch.save({k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}, buffer)
    atomic_write_bytes(out, buffer.getvalue())
    argv = ["arelbo", "features", "train", "--epochs", str(args.epochs), "--seed", str(args.seed),
            "--batch-size", str(args.batch_size), "--lr", repr(args.lr), "--out", str(args.out)]
    provenance = {
        "name": "mnist-features",
        "command": shlex.join(argv),
        "seed": args.seed,
        "data": {"dataset": "mnist", "train_split": f"train ({len(splits.train)} images: first 55000 of the "
                                                    f"official 60000 training images)",
                 "val_split": f"val ({len(splits.val)})", "test_split": f"test ({len(splits.test)})"},
        "test_accuracy": report["test_accuracy"],
        "val_accuracy": report["val_accuracy"],
        "architecture": {"class": "arelbo.metrics.features.MnistClassifier", "feature_dim": net.num_features,
                         "input": "1x28x28 float in [0,1]", "parameters": sum(p.numel() for p in net.parameters())},
        "training": {k: v for k, v in report.items() if k not in ("test_accuracy", "val_accuracy")},
        "sha256": sha256_file(out),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_text(out.with_suffix(".json"), json.dumps(provenance, indent=2) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, sha256 {provenance['sha256'][:16]}...) "
          f"and {out.with_suffix('.json')}")
    return 0


def _info(args: argparse.Namespace) -> int:
    import json

    from arelbo.metrics.features import get_feature_net

    _, info = get_feature_net("mnist-features", weights=args.weights)
    print(json.dumps(info, indent=2))
    return 0
