"""evav.buildlock: a killed extension build's lock is cleared, a live build's is left alone."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from evav import buildlock


def _lock(root: Path, op: str, age_s: float, files_age_s: float | None = None) -> Path:
    build = root / "py311_cpu" / op
    build.mkdir(parents=True)
    obj = build / "shm.o"
    obj.write_bytes(b"\0")
    lock = build / "lock"
    lock.write_text("")
    now = time.time()
    os.utime(lock, (now - age_s, now - age_s))
    age = age_s if files_age_s is None else files_age_s
    os.utime(obj, (now - age, now - age))
    os.utime(build, (now - age, now - age))
    return lock


def test_stale_lock_is_removed_and_logged(tmp_path, caplog):
    stale = _lock(tmp_path, "deepspeed_shm_comm", age_s=3600)
    with caplog.at_level(logging.INFO, logger="evav.buildlock"):
        removed = buildlock.clear_stale(tmp_path, stale_s=600)
    assert removed == [stale] and not stale.exists()
    assert (stale.parent / "shm.o").exists()  # only the lock goes
    assert "removed a stale extension build lock, 60 min old" in caplog.text


def test_young_lock_and_active_build_are_kept(tmp_path, caplog):
    young = _lock(tmp_path, "young_op", age_s=30)
    writing = _lock(tmp_path, "writing_op", age_s=3600, files_age_s=5)  # compiler output is fresh
    with caplog.at_level(logging.INFO, logger="evav.buildlock"):
        assert buildlock.clear_stale(tmp_path, stale_s=600) == []
    assert young.exists() and writing.exists()
    assert caplog.text.count("DeepSpeed waits for it") == 2


def test_lock_kept_while_a_process_works_in_the_build_directory(tmp_path):
    lock = _lock(tmp_path, "busy_op", age_s=3600)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=lock.parent)
    try:
        deadline = time.time() + 10
        while buildlock._busy(lock.parent) is None and time.time() < deadline:
            time.sleep(0.05)
        assert buildlock._busy(lock.parent) == proc.pid
        assert buildlock.clear_stale(tmp_path, stale_s=600) == []
        assert lock.exists()
    finally:
        proc.kill()
        proc.wait()
    assert buildlock.clear_stale(tmp_path, stale_s=600) == [lock]


def test_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert buildlock.extensions_root() == tmp_path / "ext"
    assert buildlock.clear_stale() == []  # an absent root is no error
