"""Errors raised by the engines.

Input errors carry a stable `problem` slug; the serving layer maps slugs to HTTP / gRPC status codes,
so the engines stay free of any transport knowledge. A BundleError is the operator's: the model's files.
"""


def validation_line(errors: list[dict], root: str = "", most: int | None = None) -> str:
    """pydantic's errors (`ValidationError.errors()`) as one line, `field: message; ...` (one about the whole model:
    `root: message`, or the message alone without a root), never quoting the input: pydantic's own message is several
    lines, with a URL and the text it read (a keys file holds secrets). `most`: show at most this many."""
    shown = errors if most is None else errors[:most]
    line = "; ".join(
        ": ".join(filter(None, (".".join(map(str, e["loc"])) or root, e["msg"].removeprefix("Value error, "))))
        for e in shown
    )
    return line + (f" (and {len(errors) - most} more)" if most is not None and len(errors) > most else "")


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
