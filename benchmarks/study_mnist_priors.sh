#!/usr/bin/env bash
# Learnable priors on MNIST: FID from each model's own prior against its ex-post samplers, same protocol as the
# evidence plan (benchmarks/study_mnist_evidence.sh), resumable and GPU-ready.
#
#   benchmarks/study_mnist_priors.sh DATA_ROOT OUT JOBS [extra arelbo compare arguments...]
#
#   DATA_ROOT  folder with the MNIST IDX files, or "" for the bundled copy
#   OUT        the evidence plan's output folder (its OUT/runs are reused for the standard prior); the studies go to
#              OUT/prior-standard, OUT/prior-mog, OUT/prior-vamp, OUT/prior-flow
#   JOBS       runs side by side (subprocesses)
#   extra      passed to every command, e.g. --dry-run (print the plans and run states, do nothing)
#   FIXED      (environment) the fixed sigma^2 values to train with every prior (default: the evidence plan's
#              candidates 0.1,0.03,0.01; pass the best one alone, e.g. FIXED=0.03, to train a third of those runs)
#
# Every run: the evidence plan's training and evaluation (mnist-conv, 20 epochs, snapshots at 2000 and 8000 steps,
# full test split, 10000 samples per sampler, 3 FID draws; GMM from 1/5/10/20 components by validation likelihood,
# the two-stage VAE) plus the flow sampler (a MAF fitted to the training codes, early stopping on the validation
# split's codes): a FID (flow) column. Policies: ar, fixed:FIXED, learned and learned-fair, seeds 0-2, each with
# model.prior = standard (N(0, I): the evidence plan's own runs, evaluated again with the flow sampler added), mog,
# vamp and flow (each in its own runs folder, OUT/runs-PRIOR). The "FID" column is each model's own prior; the
# training-time cost per step of each prior is results.json's train_seconds divided by the 8580 steps.
set -euo pipefail

USAGE_LINES=2,13  # the lines of the header above that say how to call this script
# shellcheck source=study_mnist_protocol.sh
. "$(dirname "$0")/study_mnist_protocol.sh"  # DATA_ROOT OUT JOBS from the arguments (shifted away), ARELBO, PROTOCOL
FIXED=${FIXED:-0.1,0.03,0.01}
POLICIES="ar,$(echo "$FIXED" | sed 's/\([^,]*\)/fixed:\1/g'),learned,learned-fair"

COMMON=("${PROTOCOL[@]}" --flow --seeds 0-2 --policies "$POLICIES")

$ARELBO compare "${COMMON[@]}" --runs-dir "$OUT/runs" --out "$OUT/prior-standard" "$@"
for PRIOR in mog vamp flow; do
    $ARELBO compare "${COMMON[@]}" --set "model.prior=$PRIOR" --runs-dir "$OUT/runs-$PRIOR" --out "$OUT/prior-$PRIOR" "$@"
done
