"""User-facing errors, and the exit status of each.

Anything a user can cause (a bad file, a bad option, a missing toolchain) is raised as a
`RwdeployError` with a one-line message that names the thing and says what to do. The CLI
prints that line and exits non-zero; everything else is a bug and keeps its traceback.

Exit status of `rwdeploy`: 0 success; 2 a user error (bad file, option, missing toolchain,
export failure); 3 a verification failure (the slim model differs from the original: nothing
was written); 4 the verified slim model and the report were written but a target step (TVM
import or build, cross compiler, device) failed (`TargetStepError`); 130 interrupted.
"""
from __future__ import annotations


class RwdeployError(Exception):
    """An error caused by input or environment, reported to the user as one line."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} ({hint})")

    def one_line(self) -> str:
        text = self.message if self.hint is None else f"{self.message}; {self.hint}"
        return " ".join(text.split())


class ModelFileError(RwdeployError):
    """The model file is missing, unreadable, of an unknown format, or unsafe to load."""


class OptionError(RwdeployError):
    """A command-line option or API argument is invalid."""


class ToolchainError(RwdeployError):
    """An external toolchain (cross compiler, qemu, CUDA, ...) needed by a target is missing."""


class TvmImportError(RwdeployError):
    """TVM's Relax importer cannot take the model: `node` is the graph node whose op it lacks."""

    def __init__(self, message: str, *, hint: str | None = None, node: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.node = node


class ExportError(RwdeployError):
    """A model could not be written in a deployable format (.pt2, ONNX)."""


class VerificationError(RwdeployError):
    """A transformed model does not compute the same function as the original."""

    exit_code = 3


class TargetStepError(RwdeployError):
    """The verified artifacts were written, but a target step (TVM, toolchain, device) failed."""

    exit_code = 4
