"""Errors for bad user input: always name the file (or key) and the reason."""

from __future__ import annotations

import os
import stat
from pathlib import Path

MAX_REASON_CHARS = 500  # a message can hold a whole line of data; reasons stay short


class BadInputError(ValueError):
    """An input file that cannot be used: unreadable, empty, truncated or of the wrong kind.

    ``path`` and ``reason`` are kept apart so that preprocessing can quarantine the file and
    list the reason in a manifest.
    """

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def describe_error(e: BaseException) -> str:
    """One line for an unexpected exception: its type and message (``SyntaxError: broken PNG``).

    A BadInputError is already worded for people and gives its reason alone.
    """
    if isinstance(e, BadInputError):
        return e.reason
    text = " ".join(str(e).split())  # one line: messages may hold newlines from the data
    reason = f"{type(e).__name__}: {text}" if text else type(e).__name__
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 3] + "..."
    return reason


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words, from its ``st_mode``."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_nonempty_file(path: str | Path) -> Path:
    """Raise BadInputError unless ``path`` is an existing, non-empty, readable regular file.

    Checked before any decoder sees the file: opening a FIFO would block forever, and a
    decoder's own error for a directory or an unreadable file names the wrong problem.
    """
    path = Path(path)
    try:
        st = path.stat()  # follows symbolic links
    except FileNotFoundError:
        if path.is_symlink():
            raise BadInputError(path, f"dangling symbolic link (to {os.readlink(path)})") from None
        raise BadInputError(path, "no such file") from None
    except OSError as e:  # a symlink loop (ELOOP), a name too long, an unreadable folder
        raise BadInputError(path, f"cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadInputError(path, f"not a regular file ({file_kind(st.st_mode)})")
    if st.st_size == 0:
        raise BadInputError(path, "empty file (0 bytes)")
    try:  # permissions (root passes them, but not a write-only kernel file), and others
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise BadInputError(path, f"cannot read: {e.strerror or e}") from None
    return path


def one_line(s: str, max_len: int = 300) -> str:
    """A message made safe for a log line or a report: control and other unprintable
    characters escaped (a newline in a key cannot forge a log line), at most ``max_len``."""
    s = str(s)
    out = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in s[: max_len + 1])
    return out if len(out) <= max_len else out[: max_len - 3] + "..."
