# The MNIST evidence protocol and the arguments of the study scripts that share it (study_mnist_evidence.sh,
# study_mnist_priors.sh, study_mnist_longer.sh), sourced without arguments, not run: it reads and shifts away the
# caller's DATA_ROOT OUT JOBS (printing the caller's header lines USAGE_LINES when they are missing), sets ARELBO, copy_run,
# and PROTOCOL: mnist-conv trained 20 full epochs (8580 steps), snapshots kept at steps 2000 and 8000, on CUDA
# when present; every checkpoint evaluated at the paper scale with the GMM's component count chosen from
# 1/5/10/20 on validation likelihood, the two-stage VAE (early stopping) and 3 FID draws.
if [ "$#" -lt 3 ]; then
    sed -n "${USAGE_LINES}p" "$0" >&2
    exit 2
fi
DATA_ROOT=$1
OUT=$2
JOBS=$3
shift 3
ARELBO=${ARELBO:-arelbo}  # e.g. ARELBO="python -m arelbo.cli"
PROTOCOL=(--preset mnist-conv --paper --epochs 20 --steps-per-epoch 0 --jobs "$JOBS"
          --set train.accelerator=auto --set "train.snapshot_steps=[2000, 8000]"
          --gmm-grid 1,5,10,20 --two-stage-all --two-stage-steps 20000 --two-stage-patience 5 --fid-repeats 3)
if [ -n "$DATA_ROOT" ]; then
    PROTOCOL+=(--set "data.root=$DATA_ROOT")
fi

# copy_run SRC DST [NAME...]: a finished training SRC copied to DST without its evaluations (metrics*.json,
# study-run.json, fitted samplers) nor the files NAME..., atomically (through DST.partial), for another study to
# evaluate or continue without touching SRC's.
copy_run() {
    local src=$1 dst=$2
    shift 2
    rm -rf "$dst.partial"
    cp -a "$src" "$dst.partial"
    rm -f "$dst.partial"/metrics*.json "$dst.partial"/study-run.json
    for name in "$@"; do rm -f "$dst.partial/$name"; done
    rm -rf "$dst.partial"/samplers
    mv "$dst.partial" "$dst"
}
