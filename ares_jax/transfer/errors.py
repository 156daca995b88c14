"""Transfer failures, each named so that callers can recover precisely."""


class TransferError(RuntimeError):
    """A KV transfer failed; the source still holds the request's pages."""


class TransferTimeout(TransferError):
    """A transfer did not complete within its deadline."""


class TransferShapeMismatch(TransferError):
    """The receiver asked for a shape, dtype or sharding other than what the source offers."""
