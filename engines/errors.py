"""Errors raised by the engines.

Input errors carry a stable `problem` slug; the serving layer maps slugs to HTTP / gRPC status codes,
so the engines stay free of any transport knowledge. A BundleError is the operator's: the model's files.
"""


class BundleError(RuntimeError):
    """A bundle is missing, malformed, corrupted or cannot be fetched."""


class InputError(ValueError):
    """The caller's input cannot be processed; never a server fault."""

    problem = "invalid-input"

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class InvalidImage(InputError):
    problem = "invalid-image"


class ImageTooLarge(InputError):
    problem = "image-too-large"


class InvalidMask(InputError):
    problem = "invalid-mask"


class MaskSizeMismatch(InputError):
    problem = "mask-size-mismatch"


class UnsupportedOutputFormat(InputError):
    """An in-process caller's format (the API's requests name theirs from a closed list: invalid-request)."""


class ImageSizeMismatch(InputError):
    problem = "image-size-mismatch"
