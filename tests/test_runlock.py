"""One trainer per run directory (evav/runlock.py): real trainers and real lock holders.

A second `evav train` on a directory a first one is training in stops at once, naming the
holder, and changes nothing there; a holder killed with SIGKILL frees the lock; 2-process
torchrun training takes it once (rank 0) and every rank stops when it is held elsewhere; a
second 2-node Slurm job on a run dir in training fails at once (``slurm_cluster``: skipped
without Slurm/root); and the lock file itself is hostile input (a link, a directory, a FIFO,
garbage, another host's record).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from evav import runlock
from evav.errors import BadInputError
from evav.runlock import RunInUseError
from tests.test_slurm_train import slurm_shards, steps_logged  # noqa: F401 (a fixture)
from tests.test_slurm_train import submit as slurm_submit
from tests.test_train import REPO, losses, run_train, synthetic  # noqa: F401 (a fixture)

HOST = socket.gethostname()
HOLDER = """
import sys, time
from evav import runlock
lock = runlock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def snapshot(run_dir: Path) -> dict:
    """Every path under the run dir with its size and mtime; the lock file's bytes (its mtime
    is the holder's heartbeat)."""
    out = {}
    for p in sorted(run_dir.rglob("*")):
        st = p.lstat()
        rel = str(p.relative_to(run_dir))
        out[rel] = p.read_bytes() if rel == ".lock" else (st.st_size, st.st_mtime_ns)
    return out


def start_holder(run_dir: Path, env: dict | None = None) -> subprocess.Popen:
    """A plain process that takes the run lock with evav.runlock and sleeps."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "held\n"
    return proc


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def in_use_message(run_dir: Path, pid: int) -> str:
    return f"{run_dir} is in use by pid {pid} on host {HOST} since 20"


def test_second_trainer_exits_at_once_and_writes_nothing(synthetic, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    # the first trainer commits a checkpoint at step 1 and waits at the end of step 2
    first = run_train(
        run, synthetic, "steps=4", "ckpt_every=1", env={"EVAV_FAULT": "hold:2"}, wait=False
    )
    try:
        deadline = time.monotonic() + 300
        while len(losses(run)) < 2:
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
            time.sleep(0.2)
        before = snapshot(run)
        assert {"config.yaml", "metrics.jsonl", "checkpoints/step_00000001/COMPLETE"} <= set(before)
        holder = json.loads(before[".lock"])
        assert (holder["host"], holder["pid"]) == (HOST, first.pid)

        t0 = time.monotonic()
        second = run_train(run, synthetic, "steps=4", "ckpt_every=1")
        took = time.monotonic() - t0
        assert second.returncode == 2, second.stdout[-3000:] + second.stderr[-3000:]
        assert f"evav train: error: {in_use_message(run, first.pid)}" in second.stderr
        assert "another `evav train` holds its lock" in second.stderr
        assert f"{run}/.lock: wait for it to end or stop it" in second.stderr
        assert "step 1/" not in second.stdout and "resumed from" not in second.stdout
        assert "Traceback" not in second.stderr
        assert snapshot(run) == before  # no config.yaml rewrite, no metrics, no MLflow run
        assert took < 120, f"the refused trainer took {took:.0f} s"
    finally:
        kill9(first)  # kill -9 while it holds the lock: the kernel lets go of it
    assert json.loads((run / ".lock").read_text())["pid"] == first.pid  # a stale record stays
    lock = runlock.acquire(run)
    try:
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert (run / ".lock").read_bytes() == b""  # a clean end leaves no holder


def test_a_killed_holder_frees_the_lock_and_names_its_slurm_job(tmp_path):
    run = tmp_path / "run"
    proc = start_holder(run, {"SLURM_JOB_ID": "55", "SLURM_RESTART_COUNT": "0"})
    try:
        with pytest.raises(RunInUseError) as err:
            runlock.acquire(run)
        text = str(err.value)
        assert text.startswith(in_use_message(run, proc.pid)), text
        assert "(Slurm job 55); another `evav train` holds its lock" in text
        assert err.value.path == str(run)
        assert runlock.read_holder(run).pid == proc.pid
    finally:
        kill9(proc)
    runlock.acquire(run).release()


def test_a_forked_child_that_outlives_a_killed_holder_does_not_keep_the_lock(tmp_path):
    """A DataLoader worker is a fork of the trainer and shares its open files; the lock must
    still go with the trainer."""
    run = tmp_path / "run"
    code = HOLDER.replace(
        'print("held", flush=True)',
        "r, w = os.pipe()\n"
        "child = os.fork()\n"
        "if child == 0:\n"  # fork has returned in the child: its at-fork hooks have run
        "    os.write(w, b'x')\n"
        "    time.sleep(600)\n"
        "    os._exit(0)\n"
        "os.read(r, 1)\n"
        'print("held", child, flush=True)',
    ).replace("import sys, time", "import os, sys, time")
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    word, child = proc.stdout.readline().split()
    try:
        assert word == "held"
        with pytest.raises(RunInUseError):
            runlock.acquire(run)
        kill9(proc)
        assert Path(f"/proc/{child}").exists()  # the child lives on (orphaned)
        runlock.acquire(run).release()  # the child still runs, the lock is free
    finally:
        os.kill(int(child), signal.SIGKILL)


def test_a_requeued_job_waits_for_its_previous_run_to_let_go(tmp_path, monkeypatch):
    """Slurm requeue: the same job id, SLURM_RESTART_COUNT one higher. The new run waits (up to
    REQUEUE_WAIT_S) while the old one still exits; a concurrent trainer of the *same* run of
    the job does not wait."""
    run = tmp_path / "run"
    old = start_holder(run, {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "0"})
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    t0 = time.monotonic()
    with pytest.raises(RunInUseError, match="Slurm job 77"):
        runlock.acquire(run)
    assert time.monotonic() - t0 < 5
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    threading.Timer(2.0, kill9, [old]).start()
    lock = runlock.acquire(run)
    try:
        assert time.monotonic() - t0 >= 2.0
        record = json.loads((run / ".lock").read_text())
        assert (record["slurm_job_id"], record["slurm_restart"]) == ("77", 1)
    finally:
        lock.release()


def record(run: Path, **fields) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    data = {"host": "node-b", "pid": 4242, "started": "2026-12-02 07:40:00", **fields}
    (run / ".lock").write_text(json.dumps(data))
    return run / ".lock"


def test_a_fresh_record_of_another_host_counts_as_a_live_holder(tmp_path, monkeypatch):
    """flock may not reach across nodes: a record another host refreshed within STALE_S stops
    this trainer although flock succeeded; an older one, or an earlier run of this Slurm job,
    does not."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run = tmp_path / "run"
    path = record(run)
    with pytest.raises(RunInUseError) as err:
        runlock.acquire(run)
    text = str(err.value)
    assert text.startswith(
        f"{run} is in use by pid 4242 on host node-b since 2026-12-02 07:40:00: its lock record "
        "was refreshed 0 s ago from that host, and file locks may not reach across nodes"
    ), text
    assert path.read_text().startswith('{"host": "node-b"')  # untouched
    # (a record naming a Slurm job is also asked about with scontrol; not here: no cluster)
    path = record(run, slurm_job_id="55", slurm_restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "55")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # this job, requeued: the record is its past
    runlock.acquire(run).release()

    monkeypatch.delenv("SLURM_JOB_ID")
    path = record(run)
    old = time.time() - runlock.STALE_S - 5
    os.utime(path, (old, old))
    lock = runlock.acquire(run)  # a record nobody refreshed for STALE_S: its holder is gone
    lock.release()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00\xff\xfe garbage \x89PNG",
        b"[1, 2, 3]",
        b'{"host": "h", "pid": "1234"}',
        b'{"host": "h", "pid": true}',
        b'{"host": "h", "pid": -1}',
        b'{"pid": 1}' + b" " * 10_000,  # longer than any record evav writes
    ],
)
def test_any_bytes_in_a_free_lock_file_are_replaced_by_our_record(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_bytes(content)
    lock = runlock.acquire(run)
    try:
        mine = json.loads((run / ".lock").read_text())
        assert (mine["host"], mine["pid"]) == (HOST, os.getpid())
    finally:
        lock.release()


def test_a_hostile_record_is_shown_without_its_control_characters(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text('{"host": "h\\nINJECTED\\u001b[2J", "pid": 99, "started": 5}')
    with pytest.raises(RunInUseError) as err:  # another host's fresh record
        runlock.acquire(run)
    assert str(err.value).startswith(f"{run} is in use by pid 99 on host hINJECTED[2J since 5:")
    assert "\n" not in str(err.value) and "\x1b" not in str(err.value)


def test_held_lock_with_an_unreadable_record_is_still_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_bytes(b"\x00garbage")
    code = "import fcntl,sys,time; f=open(sys.argv[1]); fcntl.flock(f, 2); print(1, flush=True); time.sleep(600)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(run / ".lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline() == "1\n"
        with pytest.raises(RunInUseError) as err:
            runlock.acquire(run)
        assert str(err.value).startswith(
            f"{run} is in use by another process (its lock record is empty or unreadable)"
        )
    finally:
        kill9(proc)


def test_a_lock_file_that_is_not_a_plain_file_is_refused_and_left_alone(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    cases = {}
    for name, make in [
        ("symlink", lambda p: p.symlink_to(outside)),
        ("hardlink", lambda p: os.link(outside, p)),
        ("directory", lambda p: p.mkdir()),
        ("fifo", lambda p: os.mkfifo(p)),
    ]:
        run = tmp_path / name
        run.mkdir()
        make(run / ".lock")
        with pytest.raises(BadInputError) as err:
            runlock.acquire(run)
        assert not isinstance(err.value, RunInUseError)
        cases[name] = str(err.value)
    assert outside.read_text() == "keep me"
    lock = tmp_path / "{}" / ".lock"
    assert cases == {
        "symlink": f"{lock.as_posix().format('symlink')}: is a symbolic link, not evav's run "
        "lock (remove it)",
        "hardlink": f"{lock.as_posix().format('hardlink')}: is a file with other links, not "
        "evav's run lock (remove it)",
        "directory": f"{lock.as_posix().format('directory')}: cannot open the run lock: Is a "
        "directory",
        "fifo": f"{lock.as_posix().format('fifo')}: is not a regular file, not evav's run lock "
        "(remove it)",
    }
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInputError, match="run_dir is not a directory"):
        runlock.acquire(tmp_path / "file")


def test_two_process_torchrun_takes_the_lock_once_and_every_rank_stops_when_held(
    synthetic,  # noqa: F811
    tmp_path,
):
    run = tmp_path / "run"
    holder = start_holder(run)
    try:
        before = snapshot(run)
        t0 = time.monotonic()
        refused = run_train(run, synthetic, "steps=2", nproc=2)
        assert refused.returncode != 0
        out = refused.stdout + refused.stderr
        assert in_use_message(run, holder.pid) in out, out[-3000:]
        assert time.monotonic() - t0 < 180  # rank 1 learned it too: nobody waits for rank 0
        assert snapshot(run) == before
    finally:
        kill9(holder)
    # rank 0 alone takes it: were rank 1 to try as well, one of them would be refused
    done = run_train(run, synthetic, "steps=2", "ckpt_every=0", nproc=2)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-3000:]
    assert sorted(losses(run)) == [1, 2]
    assert "is in use" not in done.stdout + done.stderr
    assert (run / ".lock").read_bytes() == b""


def test_a_second_slurm_job_on_a_run_dir_in_training_fails_at_once(
    slurm_cluster,
    slurm_shards,  # noqa: F811
    tmp_path,
):
    """srun, 2 nodes: a second job on the run dir of a training job fails, naming the first
    job, with both of its ranks stopped and the first job's files (its pid files too) intact."""
    run = tmp_path / "run"
    first, _ = slurm_submit(
        slurm_cluster, run, slurm_shards, "steps=60", "ckpt_every=2", fault="hold:3"
    )
    try:
        deadline = time.monotonic() + 240
        while len(steps_logged(run)) < 3:
            assert time.monotonic() < deadline, slurm_cluster.describe(first)
            assert slurm_cluster.state(first) in {"PENDING", "CONFIGURING", "RUNNING"}, (
                slurm_cluster.describe(first)
            )
            time.sleep(0.3)
        time.sleep(1)  # step 3's records are written; the trainers wait for a signal
        before = snapshot(run)
        assert sorted(p for p in before if p.startswith(f".pids/{first}/")) == [
            f".pids/{first}/node1.0",
            f".pids/{first}/node2.1",
        ]
        holder = json.loads(before[".lock"])
        assert holder["slurm_job_id"] == str(first)

        second, out = slurm_submit(slurm_cluster, run, slurm_shards, "steps=60", "ckpt_every=2")
        assert slurm_cluster.wait(second, timeout=180) == "FAILED", slurm_cluster.describe(second)
        text = out.read_text(errors="replace")
        assert f"is in use by pid {holder['pid']} on host {holder['host']}" in text, text[-4000:]
        assert f"(Slurm job {first}); another `evav train` holds its lock" in text
        assert "step 1/" not in text
        after = snapshot(run)
        # the second job's own, emptied pid folder aside, the run dir is as it was
        assert {k: v for k, v in after.items() if not k.startswith(".pids")} == {
            k: v for k, v in before.items() if not k.startswith(".pids")
        }
        assert {k for k in after if k.startswith(f".pids/{first}/")} == {
            k for k in before if k.startswith(f".pids/{first}/")
        }
        assert slurm_cluster.state(first) == "RUNNING"
    finally:
        slurm_cluster.scancel(str(first))
