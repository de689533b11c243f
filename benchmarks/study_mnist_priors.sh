#!/usr/bin/env bash
# Learnable priors on MNIST: FID from each model's own prior against its ex-post samplers, same training as the
# evidence plan (benchmarks/study_mnist_evidence.sh), resumable and GPU-ready.
#
#   benchmarks/study_mnist_priors.sh DATA_ROOT OUT JOBS [extra arelbo compare arguments...]
#
#   DATA_ROOT  folder with the MNIST IDX files, or "" for the bundled copy
#   OUT        the evidence plan's output folder; the studies go to OUT/prior-standard, OUT/prior-mog,
#              OUT/prior-vamp, OUT/prior-flow, their runs to OUT/runs-standard, OUT/runs-mog, ...
#   JOBS       runs side by side (subprocesses)
#   extra      passed to every command, e.g. --dry-run (print the plans and run states, do nothing)
#   FIXED      (environment) the fixed sigma^2 values to train with every prior (default: the evidence plan's
#              candidates 0.1,0.03,0.01; pass the best one alone, e.g. FIXED=0.01, to train a third of those runs)
#   SPECS, SEEDS (environment) the policies and seeds (defaults: ar,fixed:FIXED,learned,learned-fair and 0-2)
#   LIGHT=1    (environment) the lighter evaluation of the committed CPU results: one FID draw per sampler, the
#              last checkpoint only, no IS-NLL, no two-stage sampler
#
# Every run: the evidence plan's training and evaluation (mnist-conv, 20 epochs, snapshots at 2000 and 8000 steps,
# full test split, 10000 samples per sampler, 3 FID draws; GMM from 1/5/10/20 components by validation likelihood,
# the two-stage VAE) plus the flow sampler (a MAF fitted to the training codes, early stopping on the validation
# split's codes): a FID (flow) column. Each policy and seed with model.prior = standard (N(0, I)), mog, vamp and
# flow. The standard prior's trainings are the evidence plan's: a finished OUT/runs/<run> is copied to
# OUT/runs-standard (its evaluations left behind, so neither study re-evaluates the other's runs), otherwise
# trained there. The "FID" column is each model's own prior; the training-time cost per step of each prior is
# results.json's train_seconds divided by the 8580 steps (benchmarks/bench_train.py --priors times it alone).
set -euo pipefail

USAGE_LINES=2,16  # the lines of the header above that say how to call this script
# shellcheck source=study_mnist_protocol.sh
. "$(dirname "$0")/study_mnist_protocol.sh"  # DATA_ROOT OUT JOBS from the arguments (shifted away), ARELBO, PROTOCOL
FIXED=${FIXED:-0.1,0.03,0.01}
SPECS=${SPECS:-ar,$(echo "$FIXED" | sed 's/\([^,]*\)/fixed:\1/g'),learned,learned-fair}
SEEDS=${SEEDS:-0-2}

ARGS=()
if [ "${LIGHT:-0}" = 1 ]; then  # the protocol without the two-stage sampler, one FID draw, no snapshot evaluations
    skip=0
    for a in "${PROTOCOL[@]}"; do
        if [ "$skip" = 1 ]; then skip=0; continue; fi
        case "$a" in
            --two-stage-all) continue ;;
            --two-stage-steps|--two-stage-patience|--fid-repeats) skip=1; continue ;;
        esac
        ARGS+=("$a")
    done
    ARGS+=(--fid-repeats 1 --no-snapshots --is-examples 0)
else
    ARGS=("${PROTOCOL[@]}")
fi
COMMON=("${ARGS[@]}" --flow --seeds "$SEEDS" --policies "$SPECS")

case " $* " in *" --dry-run "*) dry=1 ;; *) dry=0 ;; esac
if [ "$dry" = 0 ]; then  # the evidence plan's finished standard-prior trainings, copied without their evaluations
    mkdir -p "$OUT/runs-standard"
    $ARELBO compare "${COMMON[@]}" --runs-dir "$OUT/runs-standard" --out "$OUT/prior-standard" --dry-run "$@" |
        awk '$1 ~ /-s[0-9]+$/ && $2 == "new" {print $1}' | while read -r run; do
        src="$OUT/runs/$run" dst="$OUT/runs-standard/$run"
        if [ -f "$src/checkpoints/last.pt" ] && [ ! -d "$dst" ]; then
            copy_run "$src" "$dst"
        fi
    done
fi
$ARELBO compare "${COMMON[@]}" --runs-dir "$OUT/runs-standard" --out "$OUT/prior-standard" "$@"
for PRIOR in mog vamp flow; do
    $ARELBO compare "${COMMON[@]}" --set "model.prior=$PRIOR" --runs-dir "$OUT/runs-$PRIOR" --out "$OUT/prior-$PRIOR" "$@"
done
