"""One exception hierarchy for the whole library.

The library raises these; only the command line turns them into a one-line message and an exit code.
Every message names the file, the format (when known) and what is wrong, and what the user can do when
there is something to do.

Messages quote strings from inside images, from servers, registries and tar headers (a backing-file name, an
extent name, a server's reason phrase). Such a string can hold newlines, CR, ESC sequences, BEL or C1 controls
that would split the one-line message, forge lines of its own or drive the terminal. Every message goes through
:meth:`DiskportError.__str__`, which is the one place they are made safe: controls and undecodable bytes become
visible escapes (``\\n``, ``\\x1b``, ``\\udcXX`` as ``\\xXX``) and each message is cut to
:data:`MAX_MESSAGE` characters.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

#: Longest message shown; a longer one (a hostile name of thousands of characters) is cut with that said.
MAX_MESSAGE = 1000
#: C0 controls, DEL, C1 controls, lone surrogates (undecodable bytes kept by "surrogateescape"), and the
#: Unicode line and paragraph separators and bidirectional overrides that rearrange what a terminal shows.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that did not decode, kept by "surrogateescape"
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line with nothing that drives a terminal: controls escaped, cut to ``limit`` characters."""
    clean = _UNSAFE.sub(_escape_char, text)
    if len(clean) > limit:
        clean = f"{clean[:limit]}... ({len(clean) - limit} more characters)"
    return clean


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
        return safe_text(f"{where}: {text}" if where else text)

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


@contextlib.contextmanager
def located(path: str | None, fmt: str | None) -> Iterator[None]:
    """Errors about the image raised inside name ``path`` and ``fmt`` where their raiser did not know them.

    Errors about the destination or the command line (:class:`DestinationError`, :class:`UsageError`) pass
    unchanged: the image's name would mislead there.
    """
    try:
        yield
    except (DestinationError, UsageError):
        raise
    except DiskportError as e:
        raise e.locate(path, fmt) from None
