"""Evaluation metrics (pure PyTorch): posterior-collapse diagnostics, likelihoods, and FID with feature networks.

Plain list of imports; each part appends its own line(s).
"""

from arelbo.metrics.collapse import (
    ACTIVE_UNIT_THRESHOLD,
    ActiveUnits,
    RunningMoments,
    active_units,
    active_units_from_loader,
    ar_sigma2,
    batch_sq_err,
    decoder_smoothness,
    encode_dataset,
    kl_per_dim,
    mutual_information,
)
from arelbo.metrics.likelihood import (
    ELBOAccumulator,
    ELBOResult,
    ISResult,
    bits_per_dim,
    importance_sampled_nll,
    importance_sampled_nll_dataset,
    linear_gaussian_nll,
    linear_vae_exact_nll,
    neg_elbo,
    resolve_sigma2,
)
from arelbo.metrics.features import (
    FEATURE_NETS,
    FeatureNetError,
    FeatureNetUnavailable,
    MnistClassifier,
    get_feature_net,
)
from arelbo.metrics.fid import compute_fid, featurize, fid_from_features, kid_from_features
