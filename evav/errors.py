"""Errors for bad user input: always name the file (or key) and the reason."""

from __future__ import annotations

from pathlib import Path


class BadInputError(ValueError):
    """An input file that cannot be used: unreadable, empty, truncated or of the wrong kind.

    ``path`` and ``reason`` are kept apart so that preprocessing can quarantine the file and
    list the reason in a manifest.
    """

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def check_nonempty_file(path: str | Path) -> Path:
    """Raise BadInputError unless ``path`` is an existing, non-empty regular file."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(path, "no such file")
    if not path.is_file():
        raise BadInputError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise BadInputError(path, "empty file (0 bytes)")
    return path
