"""Every error layerstream raises on purpose: one class per way things go wrong.

Each message carries the values involved and the fix, so a user never has to read a traceback from
deep inside the runtime to know what to change.
"""


class LayerstreamError(Exception):
    """Base of every error raised on purpose by layerstream."""


class BudgetError(LayerstreamError, ValueError):
    """A budget that cannot be parsed, or that is below what the model needs."""

    def __init__(self, message: str, minimum_bytes: int | None = None):
        super().__init__(message)
        self.minimum_bytes = minimum_bytes  # the smallest budget that would work, where known


class WeightMismatch(LayerstreamError, ValueError):
    """The weight file does not match the model: tensors missing, or shapes/dtypes that differ."""


class MetaBufferError(LayerstreamError, ValueError):
    """A non-persistent buffer (one that no weight file holds) was left on the meta device."""


class ReadError(LayerstreamError, OSError):
    """A read of the weight file failed or came back short while streaming."""


class ChecksumError(ReadError):
    """Bytes read from a packed file do not match the checksum pack recorded for them."""


class ModelError(LayerstreamError, RuntimeError):
    """The model misbehaved under streaming, e.g. used a parameter outside its module's forward."""


class ClosedError(LayerstreamError, RuntimeError):
    """The streamed model was used after close()."""
