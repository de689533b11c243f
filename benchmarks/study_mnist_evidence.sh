#!/usr/bin/env bash
# The MNIST evidence plan: three studies that test AR-ELBO's claims at convergence, resumable and GPU-ready.
#
#   benchmarks/study_mnist_evidence.sh DATA_ROOT OUT JOBS [extra arelbo compare/sweep arguments...]
#
#   DATA_ROOT  folder with the MNIST IDX files, or "" for the bundled copy
#   OUT        output folder; the studies go to OUT/headline, OUT/variants (sharing OUT/runs) and OUT/latent64
#   JOBS       runs side by side (subprocesses; on one GPU they share it, each with cores/JOBS CPU threads)
#   extra      passed to every command, e.g. --dry-run (print the plans and run states, do nothing)
#
# Every run: the mnist-conv preset trained 20 full epochs (55000 images, batch 128: 429 steps per epoch, 8580 steps),
# kept snapshots at steps 2000 and 8000, each evaluated like the final checkpoint (the paper scale: full test split,
# 10000 samples per sampler, IS-NLL K=100 on 1000 images). Samplers for every run: the prior, a GMM whose component
# count (1, 5, 10 or 20) has the best validation likelihood, and the two-stage VAE (at most 20000 steps, stopped once
# its validation -ELBO has not improved for 5 checks of 200 steps); each FID on 3 independent sample draws (the
# sampling spread), plus the FID of the test reconstructions (the floor). Every data-estimated sigma^2 in the
# likelihoods is fitted on the validation split. Training and evaluation run on CUDA when present
# (train.accelerator=auto), else on the CPU; the GMM and the second stage are fitted on the CPU.
#
# 1. headline, 5 seeds: ar, fixed:1, the fixed sigma^2 candidates 0.1, 0.03, 0.01 (the best is picked from these
#    results), learned (naive: from 1 at the model's lr), learned-fair (learned:mle,lr=0.01: from the first batch's
#    MLE with its own learning rate), and two-stage (the learned run generating through its second VAE).
# 2. variants, 3 seeds: ar-diagonal, ar-per-sample, ar-ema, ar-annealed:8000 (a sigma^2 floor decaying from 1
#    over 8000 steps), and fixed:0.0056 (AR-ELBO's final sigma^2 in the 20-epoch pilot, fixed from the start: the path
#    control), beside ar and learned, whose runs (seeds 0-2) are shared with the headline study (same configs).
# 3. latent64, 3 seeds: 64 latent units, fixed sigma^2 in {1, 0.3, 0.1, 0.03, 0.01, 0.001} beside ar, learned and
#    learned-fair: collapse (active units, KL per dimension, smoothness) against sigma^2.
#
# Runs: 35 + 15 new (variants) + 27 = 77 trainings. Rerunning the script continues where it stopped: finished runs
# are reused, interrupted ones resumed, missing evaluations (final or snapshot) redone.
set -euo pipefail

USAGE_LINES=2,10  # the lines of the header above that say how to call this script
# shellcheck source=study_mnist_protocol.sh
. "$(dirname "$0")/study_mnist_protocol.sh"  # DATA_ROOT OUT JOBS from the arguments (shifted away), ARELBO, PROTOCOL

COMMON=("${PROTOCOL[@]}")

$ARELBO compare "${COMMON[@]}" --seeds 0-4 --runs-dir "$OUT/runs" --out "$OUT/headline" \
    --policies ar,fixed:1,fixed:0.1,fixed:0.03,fixed:0.01,learned,learned-fair,two-stage "$@"

$ARELBO compare "${COMMON[@]}" --seeds 0-2 --runs-dir "$OUT/runs" --out "$OUT/variants" \
    --policies ar,ar-diagonal,ar-per-sample,ar-ema,ar-annealed:8000,fixed:0.0056,learned "$@"

# 64-dimensional codes: a 20-component full-covariance GMM costs ~2 s per EM iteration on one CPU thread (measured,
# 55000 codes, loaded 2-core box), so the sweep's grid stops at 10 components.
$ARELBO sweep "${COMMON[@]}" --gmm-grid 1,5,10 --seeds 0-2 --set model.latent_dim=64 --out "$OUT/latent64" \
    --sigma2 1,0.3,0.1,0.03,0.01,0.001 --reference ar,learned,learned-fair "$@"
