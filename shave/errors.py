"""Errors shave raises for user-facing problems.

Every message is one line that names the cause: the node, op, source line,
file or target involved. Code that catches a deep TVM or torch exception for a
user mistake re-raises one of these with `from None` so the user sees one line.
"""


class ShaveError(Exception):
    """Base class of every error shave raises on purpose."""


class CaptureError(ShaveError):
    """The model could not be traced into the IR."""


class UnsupportedOpError(CaptureError):
    """The traced model uses an op the IR cannot represent."""


class IRError(ShaveError):
    """A graph is malformed (found by `verify`)."""


class PassError(ShaveError):
    """A pass failed, or its output broke its numerical contract."""


class TargetError(ShaveError):
    """An unknown or unusable compilation target."""


class CompileError(ShaveError):
    """Lowering or building with TVM failed."""


class ArtifactError(ShaveError):
    """An artifact file is corrupt, truncated, foreign or for another target."""


class ExportError(ShaveError):
    """The graph cannot be written in an exchange format (ONNX), or the written file disagrees with it."""


class InputError(ShaveError, ValueError):
    """Run-time inputs do not match the compiled signature."""


class CompressError(ShaveError):
    """shave.compress could not go on; `.best` holds the best result found before the failure (None if
    the failure came before any)."""

    def __init__(self, message: str, best=None):
        super().__init__(message)
        self.best = best
