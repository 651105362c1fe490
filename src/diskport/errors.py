"""One exception hierarchy for the whole library.

The library raises these; only the command line turns them into a one-line message and an exit code.
Every message names the file, the format (when known) and what is wrong, and what the user can do when
there is something to do.
"""

from __future__ import annotations


class DiskportError(Exception):
    """Base of every error diskport raises on purpose. ``exit_code`` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, *, path: str | None = None, fmt: str | None = None,
                 offset: int | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.fmt = fmt
        self.offset = offset
        self.hint = hint

    def __str__(self) -> str:
        parts = []
        if self.path:
            parts.append(self.path)
        if self.fmt:
            parts.append(self.fmt)
        where = ": ".join(parts)
        text = self.message
        if self.offset is not None:
            text += f" (at offset {self.offset:#x})"
        if self.hint:
            text += f"; {self.hint}"
        return f"{where}: {text}" if where else text

    def locate(self, path: str | None = None, fmt: str | None = None) -> DiskportError:
        """Fill in the file and format if the raiser did not know them; returns self for ``raise``."""
        if self.path is None and path is not None:
            self.path = path
        if self.fmt is None and fmt is not None:
            self.fmt = fmt
        return self


class UsageError(DiskportError):
    """The user asked for something that cannot be done as asked (bad option combination, DST exists)."""

    exit_code = 2


class UnsupportedImage(DiskportError):
    """A well-formed image using a feature or format diskport does not convert."""


class CorruptImage(DiskportError):
    """The image's structures are inconsistent, truncated or out of range."""


class UnsafeImage(DiskportError):
    """The image refers outside itself (backing file, external data file, extent path) or is hostile."""


class SourceError(DiskportError):
    """The bytes could not be read (I/O error, missing file, network failure)."""


class DestinationError(DiskportError):
    """The destination could not be written (disk full, permissions, too small)."""


class RegistryError(DiskportError):
    """A registry refused a request or answered something diskport cannot use (auth, missing manifest)."""
