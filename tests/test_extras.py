"""decord and sentencepiece are optional extras: pyproject declares them so, and a config or
command that needs one that is not installed fails once, early, naming the key and the fix."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from evav.config import ConfigError
from evav.data import DataConfig, Loader
from evav.data.clips import decode
from tests.conftest import REPO

DECORD_FIX = "pip install 'evav[decord]'"
SENTENCEPIECE_FIX = "pip install 'evav[sentencepiece]'"


def without(module: str, *argv: str) -> subprocess.CompletedProcess:
    """``evav ARGV`` in a fresh interpreter where ``import MODULE`` fails (as if not installed)."""
    code = (
        f"import sys; sys.modules[{module!r}] = None; from evav.cli import main; sys.exit(main())"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def last_line(done: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stderr.strip().splitlines()[-1]


def test_pyproject_declares_decord_and_sentencepiece_as_extras_and_safetensors():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [
        d.split(";")[0].split("[")[0].split(">")[0].split("=")[0].strip().lower()
        for d in project["dependencies"]
    ]
    assert "safetensors" in names
    assert "decord" not in names and "sentencepiece" not in names
    extras = project["optional-dependencies"]
    assert extras["decord"] == ["decord>=0.6"]
    assert extras["sentencepiece"] == ["sentencepiece>=0.2"]
    # setup.sh installs .[dev]: the test suite needs both
    assert "evav[decord,sentencepiece]" in extras["dev"]
    assert "evav[decord,sentencepiece]" in extras["all"]


def test_train_with_decoder_decord_but_no_decord_is_one_line_and_exit_2(tmp_path):
    done = without(
        "decord",
        "train",
        "configs/debug.yaml",
        f"data.train=[{tmp_path / 'data'}]",  # never read: the decoder is refused first
        f"run_dir={tmp_path / 'run'}",
        "data.decoder=decord",
    )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert last_line(done) == (
        "evav train: error: data.decoder=decord needs the decord package: "
        f"{DECORD_FIX} (or data.decoder=pyav)"
    )


def test_loader_refuses_decord_before_reading_and_decode_never_skips_for_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)
    with pytest.raises(ConfigError, match=r"^data\.decoder=decord needs the decord package"):
        Loader(DataConfig(train=["/nonexistent"], decoder="decord"))
    # a missing package is the install's problem, never a bad sample (BadSample) to skip
    with pytest.raises(ImportError, match=r"needs the decord package: pip install"):
        decode(b"not an mp4", "decord")


def test_tokenizer_without_sentencepiece_names_the_extra(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a b c\n")
    done = without(
        "sentencepiece", "tokenizer", "train", "--input", str(corpus), "--out", "t.model"
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert last_line(done) == (
        f"evav tokenizer: error: evav tokenizer needs the sentencepiece package: {SENTENCEPIECE_FIX}"
    )
    model = tmp_path / "tok.model"
    model.write_bytes(b"never read")
    done = without(
        "sentencepiece",
        "render",
        "--text",
        "hi",
        "--out",
        str(tmp_path / "o.png"),
        f"tokenizer={model}",
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert last_line(done) == (
        f"evav render: error: tokenizer={model} needs the sentencepiece package: "
        f"{SENTENCEPIECE_FIX}"
    )
