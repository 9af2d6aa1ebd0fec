"""User-facing errors.

Anything a user can cause (a bad file, a bad option, a missing toolchain) is raised as a
`RwdeployError` with a one-line message that names the thing and says what to do. The CLI
prints that line and exits non-zero; everything else is a bug and keeps its traceback.
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


class ExportError(RwdeployError):
    """A model could not be written in a deployable format (.pt2, ONNX)."""


class VerificationError(RwdeployError):
    """A transformed model does not compute the same function as the original."""

    exit_code = 3
