"""Shared test fixtures: the real datasets in ../shared/datasets, and golden-image comparison.

Set EVAV_DATASETS to use another copy of the datasets; tests that need them skip, with the path
they looked in, when it is absent. Tests that take ``raw_sources`` run on made stand-ins of the
raw folders (tests/made_sources.py) always, and on the real ones too when they are present. Set EVAV_UPDATE_GOLDENS=1 to rewrite the golden PNGs (then
look at them before committing).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ["tests.slurm_fixtures"]

GOLDENS = Path(__file__).with_name("goldens")
TEST_DATA = Path(__file__).with_name("data")


def datasets_root() -> Path:
    return Path(os.environ.get("EVAV_DATASETS", REPO.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def datasets() -> Path:
    """The real-data folder; skips the test when it is absent."""
    root = datasets_root()
    if not (root / "README.md").is_file():
        pytest.skip(f"real datasets not found at {root} (set EVAV_DATASETS to their folder)")
    return root


@pytest.fixture(scope="session", params=["made", "real"])
def raw_sources(request, tmp_path_factory) -> dict[str, Path]:
    """Raw ``fsdd``, ``sst2`` and ``videos`` folders in their official layouts: made ones
    (tests/made_sources.py), then the real ones in ../shared/datasets (skipped when absent)."""
    if request.param == "real":
        root = request.getfixturevalue("datasets")
        return {name: root / name for name in ("fsdd", "sst2", "videos")}
    from tests.made_sources import make_sources

    return make_sources(tmp_path_factory.mktemp("made_sources"))


def assert_matches_golden(name: str, frames_THWC: np.ndarray, max_mean_diff: float = 1.0) -> None:
    """Compare frames (laid side by side) with ``tests/goldens/NAME.png``.

    Identical on the machine that wrote them; the tolerance (mean absolute difference in 0..255
    units, and at most 1% of pixels off by more than 32) absorbs small FreeType/FFmpeg version
    differences, never a different rendering.
    """
    strip = np.concatenate(list(frames_THWC), axis=1)
    path = GOLDENS / f"{name}.png"
    if os.environ.get("EVAV_UPDATE_GOLDENS") == "1":
        GOLDENS.mkdir(exist_ok=True)
        Image.fromarray(strip).save(path)
    assert path.is_file(), f"golden {path} missing: run with EVAV_UPDATE_GOLDENS=1 and inspect it"
    golden = np.asarray(Image.open(path).convert("RGB"))
    assert golden.shape == strip.shape, f"{name}: shape {strip.shape} != golden {golden.shape}"
    diff = np.abs(golden.astype(np.int16) - strip.astype(np.int16))
    assert diff.mean() <= max_mean_diff, f"{name}: mean abs diff {diff.mean():.2f} vs golden"
    assert (diff > 32).mean() <= 0.01, f"{name}: {(diff > 32).mean():.2%} of pixels differ by > 32"
