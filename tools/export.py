"""Kept for old scripts: ``python tools/export.py RUN --out DIR`` is ``evav export RUN --out DIR``
(evav/export.py), which see."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evav.export import add_arguments, export  # noqa: E402
from evav.export import main as _main  # noqa: E402

__all__ = ["export", "main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="export", description="the same as `evav export`")
    add_arguments(p)
    return _main(p.parse_args(argv), prog="export")


if __name__ == "__main__":
    sys.exit(main())
