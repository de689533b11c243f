# The MNIST evidence protocol, shared by study_mnist_evidence.sh and study_mnist_priors.sh (sourced, not run):
# mnist-conv trained 20 full epochs (8580 steps), snapshots kept at steps 2000 and 8000, on CUDA when present;
# every checkpoint evaluated at the paper scale with the GMM's component count chosen from 1/5/10/20 on validation
# likelihood, the two-stage VAE (early stopping) and 3 FID draws. Needs JOBS and DATA_ROOT set.
PROTOCOL=(--preset mnist-conv --paper --epochs 20 --steps-per-epoch 0 --jobs "$JOBS"
          --set train.accelerator=auto --set "train.snapshot_steps=[2000, 8000]"
          --gmm-grid 1,5,10,20 --two-stage-all --two-stage-steps 20000 --two-stage-patience 5 --fid-repeats 3)
if [ -n "$DATA_ROOT" ]; then
    PROTOCOL+=(--set "data.root=$DATA_ROOT")
fi
