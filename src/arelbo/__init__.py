"""arelbo: Gaussian VAEs whose decoder variance is set to its maximum-likelihood value (AR-ELBO).

The core (``arelbo.objectives``, ``arelbo.models``, ``arelbo.metrics``) is pure PyTorch and usable alone::

    from arelbo.objectives import GaussianVAELoss
    loss_fn = GaussianVAELoss("ar")          # AR-ELBO, the default policy
"""

__version__ = "0.1.0"
