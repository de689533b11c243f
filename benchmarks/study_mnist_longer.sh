#!/usr/bin/env bash
# The 60-epoch check of the MNIST evidence protocol: the headline trainings of seeds 0-2, continued from their
# finished 20-epoch state to 60 epochs, then evaluated exactly as the 20-epoch ones.
#
#   benchmarks/study_mnist_longer.sh DATA_ROOT OUT JOBS [extra arelbo compare arguments...]
#
#   DATA_ROOT  as for study_mnist_evidence.sh (the same value: it is part of every run's config)
#   OUT        the evidence study's folder: OUT/runs holds the 20-epoch runs (left untouched); the 60-epoch runs go
#              to OUT/runs60, their study (results.json, report) to OUT/headline60
#   JOBS       evaluations side by side (the trainings run JOBS at a time too)
#   SEEDS, SPECS, EPOCHS (environment) a subset: e.g. SEEDS="0 1" SPECS=ar,learned-fair,fixed:0.01 (defaults:
#              seeds 0-2, every headline spec, 60 epochs)
#
# Continuing is the same as training 60 epochs from the start: mnist-conv's learning rate is constant
# (train.schedule: none) and resuming is exact (data order, RNG and optimiser state restored; tests/test_resume.py).
# It saves the first 20 epochs of each of the 21 trainings. Each 20-epoch run is copied (its evaluations left
# behind) and resumed with train.epochs=60; rerunning the script continues where it stopped.
set -euo pipefail

USAGE_LINES=2,12  # the lines of the header above that say how to call this script
# shellcheck source=study_mnist_protocol.sh
. "$(dirname "$0")/study_mnist_protocol.sh"  # DATA_ROOT OUT JOBS from the arguments (shifted away), ARELBO, PROTOCOL
EPOCHS=${EPOCHS:-60}
SEEDS=${SEEDS:-0 1 2}
# the headline study's trainings as run-name:spec (two-stage shares learned's; learned-fair trains as
# learned:mle,lr=0.01); SPECS (environment, comma-separated, e.g. SPECS=ar,learned-fair,fixed:0.01) keeps a subset
ALL=(ar:ar fixed-1:fixed:1 fixed-0.1:fixed:0.1 fixed-0.03:fixed:0.03 fixed-0.01:fixed:0.01 learned:learned
     learned-mle-lr0.01:learned-fair)
SPECS=${SPECS:-ar,fixed:1,fixed:0.1,fixed:0.03,fixed:0.01,learned,learned-fair,two-stage}
POLICIES=()
for p in "${ALL[@]}"; do
    case ",$SPECS," in *",${p#*:},"*) POLICIES+=("$p") ;; esac
done
if [ "${#POLICIES[@]}" -eq 0 ]; then
    echo "SPECS=$SPECS names none of the headline policies: ${ALL[*]#*:}" >&2
    exit 2
fi

LONGER=()
for a in "${PROTOCOL[@]}"; do  # the protocol with 60 epochs instead of 20
    if [ "${prev:-}" = "--epochs" ]; then a=$EPOCHS; fi
    LONGER+=("$a")
    prev=$a
done

mkdir -p "$OUT/runs60"
extend() {  # copy one finished 20-epoch run and continue it to EPOCHS epochs
    local name=$1 src="$OUT/runs/$1" dst="$OUT/runs60/$1"
    if [ ! -d "$dst" ]; then
        if [ ! -f "$src/checkpoints/last.pt" ]; then
            echo "$src: no finished 20-epoch run; run benchmarks/study_mnist_evidence.sh first" >&2
            return 1
        fi
        copy_run "$src" "$dst" samples.png  # (its training's samples.png: the continued training writes its own)
    fi
    if [ ! -f "$dst/extended-to-$EPOCHS" ]; then  # (a finished run refuses a resume to its own length)
        $ARELBO train --resume "$dst" --set "train.epochs=$EPOCHS" --quiet
        touch "$dst/extended-to-$EPOCHS"
    fi
}
export -f extend copy_run
export OUT ARELBO EPOCHS
for p in "${POLICIES[@]}"; do
    for s in $SEEDS; do echo "${p%%:*}-s$s"; done
done | xargs -P "$JOBS" -I{} bash -c 'extend "$@"' _ {}

$ARELBO compare "${LONGER[@]}" --seeds "${SEEDS// /,}" --runs-dir "$OUT/runs60" --out "$OUT/headline60" \
    --policies "$SPECS" "$@"
