"""The local Slurm cluster (tools/slurm_cluster.py) behaves like a real multi-node cluster.

These tests pin down the Slurm behaviour evav's sbatch templates rely on: two nodes with one
task each agree on a master address, preemption signals reach the right processes
(``scancel --signal`` with and without ``--batch``/``--full``; ``--signal`` with and without
``B:``), a job requeues itself and runs again in the same output file, a time-limit warning
signal arrives before the limit, ``--dependency=afterok`` orders jobs. They also check the
tool: start/stop from the command line, stop ends job processes, a failed start cleans up.
Findings are written up in docs/local_slurm.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

# The fixture module is also loaded as a plugin (pytest_plugins below): let pytest rewrite its
# asserts although this module imports it first.
pytest.register_assert_rewrite("tests.slurm_fixtures")
from tests.slurm_fixtures import REPO, SlurmHarness, slurm_tool  # noqa: E402

pytest_plugins = ["tests.slurm_fixtures"]  # the slurm_cluster fixture


def write_script(path: Path, body: str) -> Path:
    """Write an executable bash job script."""
    path.write_text("#!/bin/bash\n" + body.lstrip("\n"))
    path.chmod(0o755)
    return path


def wait_for_file_text(path: Path, text: str, timeout: float, harness: SlurmHarness, job: int):
    """Poll until ``path`` contains ``text``; fail with the job's state and the logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text():
            return
        time.sleep(0.2)
    content = path.read_text() if path.is_file() else "(missing)"
    pytest.fail(f"{path} never got {text!r}: {content}\n{harness.describe(job)}")


def marker_processes(cluster_dir: Path) -> list[int]:
    """Processes carrying a cluster's environment marker (its daemons and slurmstepd)."""
    entry = f"{slurm_tool.MARKER_ENV}={cluster_dir}".encode()
    return [
        int(p)
        for p in os.listdir("/proc")
        if p.isdigit()
        and slurm_tool._pid_alive(int(p))
        and slurm_tool._proc_environ_has(int(p), entry)
    ]


def test_two_node_job_runs_one_task_per_node_and_agrees_on_master(
    slurm_cluster: SlurmHarness, tmp_path: Path
) -> None:
    script = write_script(
        tmp_path / "two_nodes.sh",
        """
#SBATCH --nodes=2 --ntasks-per-node=1 --time=0:02:00
srun bash -c '
  MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)
  # Node names of the local cluster do not resolve (no /etc/hosts entry): the address to
  # connect to is the node'"'"'s NodeAddr (127.0.0.1 here, usually the hostname elsewhere).
  ADDR=$(scontrol show node "$MASTER" -o | grep -o "NodeAddr=[^ ]*" | cut -d= -f2)
  echo "task $SLURMD_NODENAME $SLURM_PROCID $SLURM_NTASKS $MASTER $ADDR"'
""",
    )
    out = tmp_path / "out.txt"
    job = slurm_cluster.sbatch(script, f"--output={out}")
    assert slurm_cluster.wait(job, timeout=60) == "COMPLETED", slurm_cluster.describe(job)
    tasks = sorted(
        line.split()[1:] for line in out.read_text().splitlines() if line.startswith("task")
    )
    assert [t[:3] for t in tasks] == [["node1", "0", "2"], ["node2", "1", "2"]], out.read_text()
    masters = {tuple(t[3:]) for t in tasks}
    assert masters == {("node1", "127.0.0.1")}, f"tasks disagree on the master: {tasks}"


# A job whose batch shell and whose srun step (one task) each record the USR2 they receive.
SIGNAL_PROBE = r"""
#SBATCH --nodes=1 --ntasks=1 --time=0:05:00
export OUT={out}
trap 'echo "batch USR2 $(date +%s)" >> $OUT' USR2
echo "batch ready $(date +%s)" >> $OUT
srun bash -c 'trap "echo step USR2 \$(date +%s) >> $OUT; exit 0" USR2
  echo "step ready $(date +%s)" >> $OUT
  for i in $(seq 240); do sleep 0.5; done' &
SRUN=$!
for i in $(seq 240); do sleep 0.5; done
"""


@pytest.mark.parametrize(
    ("flags", "batch_gets", "step_gets"),
    [([], False, True), (["--batch"], True, False), (["--full"], True, True)],
    ids=["default-steps-only", "batch-shell-only", "full-everything"],
)
def test_scancel_signal_reaches(
    slurm_cluster: SlurmHarness,
    tmp_path: Path,
    flags: list[str],
    batch_gets: bool,
    step_gets: bool,
) -> None:
    """``scancel --signal=USR2``: steps only; ``--batch``: batch shell only; ``--full``: both."""
    out = tmp_path / "signals.txt"
    script = write_script(tmp_path / "probe.sh", SIGNAL_PROBE.format(out=out))
    job = slurm_cluster.sbatch(script, f"--output={tmp_path}/slurm-%j.out")
    try:
        wait_for_file_text(out, "step ready", 30, slurm_cluster, job)
        slurm_cluster.scancel("--signal=USR2", *flags, str(job))
        expected = ["batch USR2"] * batch_gets + ["step USR2"] * step_gets
        for text in expected:
            wait_for_file_text(out, text, 15, slurm_cluster, job)
        time.sleep(1.5)  # the signal that should not arrive would have arrived by now
        text = out.read_text()
        assert ("batch USR2" in text) == batch_gets, text
        assert ("step USR2" in text) == step_gets, text
    finally:
        slurm_cluster.scancel(str(job))


def test_job_requeues_itself_after_preemption_signal(
    slurm_cluster: SlurmHarness, tmp_path: Path
) -> None:
    """The training template's pattern: the step gets USR2, exits; the batch script requeues
    the job; the second run (SLURM_RESTART_COUNT=1) appends to the same output file."""
    out = tmp_path / "requeue.out"
    script = write_script(
        tmp_path / "requeue.sh",
        r"""
#SBATCH --nodes=1 --ntasks=1 --time=0:05:00 --requeue --open-mode=append
RUN=${SLURM_RESTART_COUNT:-0}
echo "run $RUN start $(date +%s)"
if [ "$RUN" = 0 ]; then
  srun bash -c 'trap "echo step got USR2; touch preempted; exit 0" USR2
    echo "step ready"
    for i in $(seq 240); do sleep 0.5; done'
  if [ -f preempted ]; then
    rm preempted
    echo "requeueing $(date +%s)"
    scontrol requeue "$SLURM_JOB_ID"
    sleep 60
    echo "NOT REACHED: the requeue kills this run"
  fi
  exit 1
fi
echo "run $RUN done $(date +%s)"
""",
    )
    job = slurm_cluster.sbatch(script, f"--output={out}", cwd=tmp_path)
    wait_for_file_text(out, "step ready", 30, slurm_cluster, job)
    t0 = time.monotonic()
    slurm_cluster.scancel("--signal=USR2", str(job))
    assert slurm_cluster.wait(job, timeout=90) == "COMPLETED", slurm_cluster.describe(job)
    elapsed = time.monotonic() - t0
    text = out.read_text()
    lines = [line.split(" ")[0:2] for line in text.splitlines()]
    assert ["run", "0"] in lines and ["run", "1"] in lines, text
    assert "step got USR2" in text and "requeueing" in text, text
    assert "NOT REACHED" not in text, text
    assert text.index("run 0 start") < text.index("requeueing") < text.index("run 1 start")
    assert slurm_cluster.job(job).get("Restarts") == "1"
    print(f"signal -> requeued run completed in {elapsed:.1f} s")


# The batch shell traps USR2 from the time-limit warning and forwards it to srun, which
# passes it on to its tasks (the ``B:`` pattern); or the step gets it directly (no ``B:``).
TIME_LIMIT_PROBE = r"""
#SBATCH --nodes=1 --ntasks=1 --time=0:01:00 --signal={signal}
trap 'echo "batch USR2 $(date +%s)" >> $OUT; kill -USR2 $SRUN' USR2
export OUT={out}
echo "start $(date +%s)" >> $OUT
srun bash -c 'trap "echo step USR2 \$(date +%s) >> $OUT; exit 0" USR2
  for i in $(seq 240); do sleep 0.5; done' &
SRUN=$!
# wait returns early when a trapped signal arrives: wait again for srun to end
while kill -0 $SRUN 2>/dev/null; do wait $SRUN; done
echo "end $(date +%s)" >> $OUT
"""


def test_time_limit_signal_arrives_before_the_limit(
    slurm_cluster: SlurmHarness, tmp_path: Path
) -> None:
    """``--time=1 --signal=[B:]USR2@25``: the warning arrives within Slurm's 30 s time-limit
    check period, before the limit; with ``B:`` only the batch shell gets it (and forwards
    it: srun passes USR2 on to the tasks), without ``B:`` only the step's processes."""
    outs = {mode: tmp_path / f"{mode}.txt" for mode in ("batch", "steps")}
    jobs = {}
    for mode, sig in (("batch", "B:USR2@25"), ("steps", "USR2@25")):
        script = write_script(
            tmp_path / f"{mode}.sh", TIME_LIMIT_PROBE.format(signal=sig, out=outs[mode])
        )
        jobs[mode] = slurm_cluster.sbatch(script, f"--output={tmp_path}/{mode}-%j.out")
    for job in jobs.values():
        assert slurm_cluster.wait(job, timeout=100) == "COMPLETED", slurm_cluster.describe(job)
    latencies = {}
    for mode, out in outs.items():
        events = {}
        for line in out.read_text().splitlines():
            words = line.split()
            events.setdefault(" ".join(words[:-1]), int(words[-1]))
        got = "batch USR2" if mode == "batch" else "step USR2"
        assert got in events, f"{mode}: {events}"
        latencies[mode] = events[got] - events["start"]
        assert latencies[mode] < 60, f"{mode}: warning after the 60 s limit: {events}"
        assert "end" in events, events
        if mode == "batch":
            assert "step USR2" in events, f"srun did not forward USR2 to its task: {events}"
        else:
            assert "batch USR2" not in events, f"without B: the batch shell got it: {events}"
    print(f"time-limit warning latency after job start (s): {latencies}")


def test_afterok_dependency_runs_after_success_and_is_cancelled_after_failure(
    slurm_cluster: SlurmHarness, tmp_path: Path
) -> None:
    first = write_script(tmp_path / "first.sh", "sleep 3\ntouch first.done\n")
    second = write_script(tmp_path / "second.sh", "test -f first.done && echo saw-first\n")
    failing = write_script(tmp_path / "failing.sh", "exit 3\n")
    a = slurm_cluster.sbatch(first, f"--output={tmp_path}/a.out", cwd=tmp_path)
    b = slurm_cluster.sbatch(
        second, f"--dependency=afterok:{a}", f"--output={tmp_path}/b.out", cwd=tmp_path
    )
    c = slurm_cluster.sbatch(failing, f"--output={tmp_path}/c.out", cwd=tmp_path)
    d = slurm_cluster.sbatch(
        second, f"--dependency=afterok:{c}", f"--output={tmp_path}/d.out", cwd=tmp_path
    )
    assert slurm_cluster.job(b)["JobState"] == "PENDING"
    assert slurm_cluster.wait(b, timeout=60) == "COMPLETED", slurm_cluster.describe(b)
    assert (tmp_path / "b.out").read_text().strip() == "saw-first"
    a_end = datetime.fromisoformat(slurm_cluster.job(a)["EndTime"])
    b_start = datetime.fromisoformat(slurm_cluster.job(b)["StartTime"])
    assert b_start >= a_end
    assert slurm_cluster.wait(c, timeout=30) == "FAILED"
    # kill_invalid_depend: a never-satisfiable dependency cancels the job instead of leaving
    # it pending forever.
    assert slurm_cluster.wait(d, timeout=30) == "CANCELLED", slurm_cluster.describe(d)
    assert not (tmp_path / "d.out").exists()


def test_cli_start_status_stop_ends_daemons_and_jobs(tmp_path: Path) -> None:
    """A second, one-node cluster from the command line; stop ends a running job too."""
    if slurm_tool.missing_binaries() or os.geteuid() != 0:
        pytest.skip("needs root and the Slurm/munge binaries")
    cli = [sys.executable, str(REPO / "tools" / "slurm_cluster.py")]
    directory = tmp_path / "cluster"  # under a 0700 dir: munged's socket goes to /tmp
    res = subprocess.run(
        [*cli, "start", "--dir", str(directory), "--nodes", "1", "--cpus-per-node", "2"],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        assert res.returncode == 0, res.stderr
        assert f"export SLURM_CONF={directory / 'slurm.conf'}" in res.stdout
        cluster = slurm_tool.Cluster.load(directory)
        harness = SlurmHarness(cluster)
        res = subprocess.run(
            [*cli, "status", "--dir", str(directory)], capture_output=True, text=True, check=False
        )
        assert res.returncode == 0 and "node1 idle" in res.stdout, res.stdout + res.stderr
        pid_file = tmp_path / "job.pid"
        script = write_script(tmp_path / "long.sh", f"sleep 300 &\necho $! > {pid_file}\nwait\n")
        job = harness.sbatch(script, f"--output={tmp_path}/long.out")
        harness.wait_for(job, {"RUNNING"}, timeout=30)
        wait_for_file_text(pid_file, "\n", 30, harness, job)
        job_pid = int(pid_file.read_text())
        daemons = list(cluster.pids.values())
        assert marker_processes(directory)
    finally:
        res = subprocess.run(
            [*cli, "stop", "--dir", str(directory)], capture_output=True, text=True, check=False
        )
    assert res.returncode == 0, res.stderr
    for pid in [*daemons, job_pid]:
        assert not slurm_tool._pid_alive(pid), f"pid {pid} survived stop"
    assert marker_processes(directory) == []
    res = subprocess.run(
        [*cli, "status", "--dir", str(directory)], capture_output=True, text=True, check=False
    )
    assert res.returncode == 1 and "stopped" in res.stdout


def test_failed_start_reports_logs_and_leaves_nothing_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if slurm_tool.missing_binaries() or os.geteuid() != 0:
        pytest.skip("needs root and the Slurm/munge binaries")
    render = slurm_tool.render_slurm_conf
    monkeypatch.setattr(
        slurm_tool, "render_slurm_conf", lambda *a, **k: render(*a, **k) + "BogusOption=1\n"
    )
    directory = Path("/tmp") / f"evav-slurm-test-{os.getpid()}"
    try:
        with pytest.raises(slurm_tool.ClusterError) as err:
            slurm_tool.start(directory, nodes=1, timeout=30)
        message = str(err.value)
        assert "slurmctld exited" in message and "BogusOption" in message, message
        assert marker_processes(directory) == []
    finally:
        slurm_tool.stop(directory, quiet=True)
        shutil.rmtree(directory, ignore_errors=True)
