"""One-line messages: errors become a single line a user (or a summary CSV) can show."""

from __future__ import annotations


def one_line(text: object) -> str:
    """Collapse whitespace so that an error reason fits on one line."""
    return " ".join(str(text).split()) or "unknown error"


def reason(exc: BaseException) -> str:
    """A one-line reason for an exception (its message, else its type)."""
    return one_line(exc) if str(exc).strip() else type(exc).__name__


def first_line(exc: BaseException, *, typed: bool = False) -> str:
    """The first line of an exception's message (else its type); ``typed``: prefixed by its type."""
    msg = str(exc).strip().splitlines()
    text = msg[0] if msg else ""
    if typed:
        return f"{type(exc).__name__}: {text}".rstrip(": ")
    return text or type(exc).__name__


def read_head(path, size: int = 16) -> bytes:
    """First bytes of a file (empty on failure)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(size)
    except OSError:
        return b""
