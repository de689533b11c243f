"""``arelbo sweep``: fixed sigma^2 over a log grid beside AR-ELBO; the options and the run of
:mod:`arelbo.cli.compare`, which tells the two commands apart by the parser's name."""

from arelbo.cli.compare import add_arguments, run

__all__ = ["add_arguments", "run"]
