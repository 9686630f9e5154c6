"""Which code is running: the evav version and the git commit of its source tree."""

from __future__ import annotations

import subprocess
from pathlib import Path

from evav import __version__

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    """The commit checked out in evav's source tree, or None (an installed copy, no git)."""
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def code_version() -> str:
    """``evav VERSION`` plus the git commit of the source tree, when there is one."""
    commit = git_commit()
    return f"evav {__version__}" + (f" (git {commit[:12]})" if commit else "")
