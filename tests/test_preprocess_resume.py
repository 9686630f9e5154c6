"""Parallel, resumable, splittable builds give exactly the same shards and manifest.

- A 2-worker build killed with SIGKILL midway, then rerun, equals an uninterrupted build (same
  manifest, same shard bytes), and no partial shard is ever visible under its final name.
- Two --part builds plus --merge equal a single build; merging before every part is done
  fails and names the missing shards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evav.cli import main
from evav.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]
SYNTH = ["train_per_task=100", "val_per_task=20", "--shard-samples", "8"]  # 600 inputs, 76 shards


def run_cli(out: Path, log: Path, *args: str) -> subprocess.Popen:
    """`evav preprocess synthetic` in its own process group (so a kill reaches its workers)."""
    cmd = [sys.executable, "-m", "evav.cli", "preprocess", "synthetic", "--out", str(out), *args]
    with open(log, "w") as f:
        return subprocess.Popen(
            cmd, cwd=REPO, start_new_session=True, stdout=f, stderr=subprocess.STDOUT
        )


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/shard-*.tar"))}


def manifest_dict(out: Path, drop: tuple[str, ...] = ()) -> dict:
    d = json.loads((out / "manifest.json").read_text())
    return {k: v for k, v in d.items() if k not in drop}


def test_sigkilled_two_worker_build_resumes_to_identical_output(tmp_path):
    out = tmp_path / "out"  # the same path for both builds, so even the recorded commands match
    log = tmp_path / "log.txt"
    ref = run_cli(out, log, "--workers", "2", *SYNTH)
    assert ref.wait(timeout=300) == 0, log.read_text()
    ref_manifest, ref_shards = manifest_dict(out), shard_bytes(out)
    out.rename(tmp_path / "reference")

    proc = run_cli(out, log, "--workers", "2", *SYNTH)
    records = out / ".build"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(records.glob("*/shard-*.json"))) < 3:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and both workers, mid-shard
    proc.wait()
    done = len(list(records.glob("*/shard-*.json")))
    assert 3 <= done < 76 and not (out / "manifest.json").exists(), f"{done} shards done at kill"
    for tar in out.glob("*/shard-*.tar"):  # a visible shard is complete: the finished bytes
        assert tar.read_bytes() == ref_shards[str(tar.relative_to(out))]

    rerun = run_cli(out, log, "--workers", "2", *SYNTH)
    assert rerun.wait(timeout=300) == 0, log.read_text()
    assert f"{done} of 76 shards already done" in log.read_text()
    assert not list(out.glob("*/.shard-*"))  # no temporary files left
    assert manifest_dict(out) == ref_manifest
    assert shard_bytes(out) == ref_shards


def test_a_worker_killed_from_outside_stops_the_build_instead_of_hanging(tmp_path):
    """The OOM killer (or a crash inside a C decoder) takes a worker and its shard: the build
    says so and exits 2 (the Pool would wait for that shard forever); a rerun resumes."""
    out, log = tmp_path / "out", tmp_path / "log.txt"
    proc = run_cli(out, log, "--workers", "2", *SYNTH)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / ".build").glob("*/shard-*.json")):
        time.sleep(0.01)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert children, "no worker processes found"
    os.kill(int(children[0]), signal.SIGKILL)
    assert proc.wait(timeout=120) == 2, log.read_text()
    assert "a worker process died while building" in log.read_text()
    assert not (out / "manifest.json").exists()
    rerun = run_cli(out, log, "--workers", "2", *SYNTH)
    assert rerun.wait(timeout=300) == 0, log.read_text()
    assert load_manifest(out).num_samples == 600


def synthetic(out: Path, *extra: str) -> int:
    args = ["train_per_task=6", "val_per_task=2", "--shard-samples", "7", *extra]
    return main(["preprocess", "synthetic", "--out", str(out), *args])


def test_two_parts_then_merge_equal_a_single_build(tmp_path, capsys):
    assert synthetic(tmp_path / "single") == 0
    parts = tmp_path / "parts"
    assert synthetic(parts, "--num-parts", "2", "--part", "1") == 0
    assert not (parts / "manifest.json").exists()
    capsys.readouterr()
    assert main(["preprocess", "--merge", "--out", str(parts)]) == 2
    err = capsys.readouterr().err
    assert "shards are not built yet" in err and "train/shard-000000 (part 0)" in err
    assert synthetic(parts, "--num-parts", "2", "--part", "0") == 0
    assert main(["preprocess", "--merge", "--out", str(parts)]) == 0
    drop = ("commands", "code_version")
    assert manifest_dict(parts, drop) == manifest_dict(tmp_path / "single", drop)
    assert shard_bytes(parts) == shard_bytes(tmp_path / "single")
    assert len(load_manifest(parts).commands) == 2


def test_slurm_array_environment_picks_the_part(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    assert (
        main(
            [
                "preprocess",
                "synthetic",
                "--out",
                str(tmp_path),
                "train_per_task=2",
                "val_per_task=1",
                "--shard-samples",
                "2",
            ]
        )
        == 0
    )
    built = sorted(
        str(p.relative_to(tmp_path / ".build")) for p in tmp_path.glob(".build/*/shard-*.json")
    )
    assert built == ["train/shard-000002.json", "val/shard-000000.json"]  # every 3rd shard, from 2


def test_rerun_with_other_settings_is_refused(tmp_path, capsys):
    base = ["preprocess", "synthetic", "--out", str(tmp_path), "train_per_task=2", "val_per_task=1"]
    assert main(base) == 0
    assert main([*base, "--seed", "3"]) == 2
    assert "holds a build with other settings (seed" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--part", "2", "--num-parts", "2"], "--part must be in 0..1"),
        (["--part", "-1"], "--part must be in 0..0, got -1"),
        (["--num-parts", "0"], "--num-parts must be >= 1, got 0"),
        (["--workers", "0"], "--workers must be between 1 and 1024, got 0"),
        (["--workers", "-2"], "--workers must be between 1 and 1024, got -2"),
        (["--workers", "100000"], "--workers must be between 1 and 1024, got 100000"),
        (["--shard-mb", "-5"], "--shard-mb must be a number in (0, 1e+06], got -5.0"),
        (["--shard-mb", "0"], "--shard-mb must be a number in (0, 1e+06], got 0.0"),
        (["--shard-mb", "nan"], "--shard-mb must be a number in (0, 1e+06], got nan"),
        (["--shard-mb", "inf"], "--shard-mb must be a number in (0, 1e+06], got inf"),
        (["--shard-mb", "1e999"], "--shard-mb must be a number in (0, 1e+06], got inf"),
        (["--shard-samples", "0"], "--shard-samples must be >= 1, got 0"),
        (["--shard-samples", "-7"], "--shard-samples must be >= 1, got -7"),
        (["--limit", "-1"], "--limit must be >= 0, got -1"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        (["train_per_task=-1"], "train_per_task must be in 0..10000000, got -1"),
        (["render.font_scale=nan"], "font_scale must be in (0, 100], got nan"),
        (["render.audio.n_mels=0"], "audio.n_mels must be between 1 and 4096, got 0"),
        (["nosuchoption=1"], "unknown config key 'synthetic.nosuchoption'"),
        (["--codec", "bogus"], "expected a preset"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_arguments_are_clear_errors(tmp_path, capsys, bad, message):
    """Every numeric option is checked (finite, in range) before any work, naming the option."""
    assert main(["preprocess", "synthetic", "--out", str(tmp_path), *bad]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / ".build").exists()  # refused before any work


def test_slurm_environment_that_is_not_a_number_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "three")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    assert main(["preprocess", "synthetic", "--out", str(tmp_path)]) == 2
    assert "SLURM_ARRAY_TASK_COUNT='three' is not an integer" in capsys.readouterr().err
