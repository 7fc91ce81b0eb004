"""Errors a user can act on. The CLI prints their message; ``exit_code`` is the status."""


class ShrinkflowError(Exception):
    """A failure with a message that says what is wrong and how to fix it."""

    exit_code = 1


class ParamsError(ShrinkflowError):
    """params.yaml (or an override) is invalid. Raised before any stage runs."""

    exit_code = 2


class InputError(ShrinkflowError):
    """A file named by the params (data, checkpoint, model file) is missing or unreadable."""

    exit_code = 2


class TrainingDiverged(ShrinkflowError):
    """The loss became NaN or infinite."""


class UntrustedModel(InputError):
    """A model file or spec names a Python class whose module the caller did not allow."""
