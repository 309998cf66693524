"""User-facing errors.

Every error a user can cause by bad input derives from :class:`DeltaVisionError`;
the CLI prints its message in one line and exits with status 2 instead of
showing a traceback.
"""


class DeltaVisionError(Exception):
    """A problem with the user's input or environment, explained in its message."""


class UnknownBackboneError(DeltaVisionError, ValueError):
    pass


class UnknownMethodError(DeltaVisionError, ValueError):
    pass


class MethodOptionError(DeltaVisionError, ValueError):
    pass


class IncompatibleMethodError(DeltaVisionError, ValueError):
    """The method cannot be applied to (or merged on) this backbone."""


class AdapterFileError(DeltaVisionError):
    """An adapter or checkpoint file is missing, corrupt or for another model."""


class WeightsUnavailableError(DeltaVisionError):
    """Pretrained weights could not be found locally nor downloaded."""


class HubError(DeltaVisionError):
    """An adapter could not be fetched from, or pushed to, the Hugging Face Hub."""


class ExportError(DeltaVisionError):
    """A model could not be exported, or its export does not compute what the model computes."""


class DataError(DeltaVisionError):
    """A dataset or image could not be read."""


class ArtifactExistsError(DeltaVisionError):
    """Refusing to overwrite an existing output."""


class NonFiniteLossError(DeltaVisionError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


class NewerVersionWarning(UserWarning):
    """A file was written by a newer deltavision than the one reading it."""
