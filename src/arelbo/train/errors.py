"""How a training run stops early: errors the caller can act on."""

__all__ = ["NonFiniteLossError", "TrainingInterrupted"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the message names the global step and epoch."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C (or another interrupt Lightning caught): the run stopped early and can be resumed."""

