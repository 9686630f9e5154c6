"""pytest fixture ``slurm_cluster``: a real Slurm cluster on this host for the whole session.

Use it from any test module::

    from tests.slurm_fixtures import slurm_cluster  # noqa: F401  (or: pytest_plugins = [...])

    def test_job(slurm_cluster, tmp_path):
        script = tmp_path / "job.sh"
        script.write_text("#!/bin/bash\\n#SBATCH --nodes=2 --ntasks-per-node=1\\nsrun hostname\\n")
        job = slurm_cluster.sbatch(script, f"--output={tmp_path}/out-%j.txt")
        assert slurm_cluster.wait(job, timeout=60) == "COMPLETED"

The cluster (``tools/slurm_cluster.py``: own munged, slurmctld, two ``slurmd -N nodeI``, all
on 127.0.0.1, 4 CPUs per node) is started once, in a new ``/tmp/evav-slurm-*`` directory, and
always stopped at the end of the session, also when tests fail, are interrupted (Ctrl-C,
SIGTERM) or the interpreter exits early (atexit guard). Jobs run as root; their environment
is the submitting one, so give ``env=`` or ``--export`` to pass variables. There is no
accounting database: ``sacct`` does not work; :meth:`SlurmHarness.wait` uses ``scontrol`` and
falls back to the job-completion log.

Skips (with the reason) when the Slurm/munge binaries are missing or not running as root.
Environment knobs: ``EVAV_SLURM_CONF=/path/slurm.conf`` uses an already running cluster
(started with ``tools/slurm_cluster.py start``) instead of starting one;
``EVAV_SLURM_KEEP=1`` keeps the cluster directory (logs) after the session; it is also kept
when a test failed.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import FrameType

import pytest

from tools import slurm_cluster as slurm_tool
from tools.slurm_cluster import TERMINAL_STATES, Cluster

REPO = Path(__file__).resolve().parents[1]
_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_:/.]*$")


class SlurmJobTimeout(AssertionError):
    """A job did not reach the awaited state in time (message: job record and log tails)."""


def parse_scontrol_record(text: str) -> dict[str, str]:
    """Parse one ``scontrol show ... -o`` line (``Key=value Key=value ...``) into a dict.

    A token without ``=`` belongs to the previous value (values with spaces, e.g. a command).
    """
    record: dict[str, str] = {}
    last: str | None = None
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep and _KEY.match(key):
            record[key] = value
            last = key
        elif last is not None:
            record[last] += " " + token
    return record


class SlurmHarness:
    """A running local cluster and helpers to drive it from tests.

    Attributes: ``dir`` (cluster directory, logs in ``dir/log``), ``conf`` (its slurm.conf),
    ``env`` (a copy of ``os.environ`` with ``SLURM_CONF`` set: pass it to every Slurm client
    and to subprocesses that submit jobs), ``nodes`` (node names, e.g. ``["node1", "node2"]``),
    ``cluster`` (the :class:`tools.slurm_cluster.Cluster`).
    """

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.dir: Path = cluster.dir
        self.conf: Path = cluster.conf
        self.env: dict[str, str] = cluster.env()
        # the "nodes" share this host's cores, which evav.threads cannot know from inside a
        # job: one CPU thread per job task, as slurm/*.sbatch used to set
        self.env.setdefault("OMP_NUM_THREADS", "1")
        self.nodes: list[str] = list(cluster.nodes)

    # ---------------------------------------------------------------- clients

    def run(
        self,
        *argv: str | os.PathLike[str],
        check: bool = True,
        timeout: float = 30.0,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client (``sbatch``, ``squeue``, ...) against this cluster.

        ``env`` entries are added to :attr:`env`. With ``check``, a non-zero exit raises
        ``RuntimeError`` carrying the command's stderr.
        """
        args = [str(a) for a in argv]
        exe = slurm_tool.which(args[0]) or args[0]
        full_env = dict(self.env)
        if env:
            full_env.update(env)
        res = subprocess.run(
            [exe, *args[1:]],
            env=full_env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and res.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed ({res.returncode}):\n{res.stderr}{res.stdout}"
            )
        return res

    def sbatch(
        self,
        script: str | os.PathLike[str],
        *args: str,
        script_args: Iterable[str] = (),
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> int:
        """Submit ``script`` with sbatch options ``args``; return the job id.

        ``script_args`` go after the script; ``cwd`` is the job's submit (and working)
        directory, default the script's directory.
        """
        script = Path(script)
        res = self.run(
            "sbatch",
            "--parsable",
            *args,
            str(script),
            *script_args,
            cwd=cwd if cwd is not None else script.parent,
            env=env,
        )
        return int(res.stdout.strip().split(";")[0])

    def scontrol(self, *args: str, check: bool = True) -> str:
        """``scontrol ARGS``: its stdout."""
        return self.run("scontrol", *args, check=check).stdout

    def squeue(self, *args: str) -> str:
        """``squeue ARGS``: its stdout."""
        return self.run("squeue", *args).stdout

    def scancel(self, *args: str) -> None:
        """``scancel ARGS`` (e.g. ``"--signal=USR2", str(job)``)."""
        self.run("scancel", *args)

    # ---------------------------------------------------------------- job state

    def job(self, job_id: int | str) -> dict[str, str]:
        """The job's ``scontrol show job`` record ({} once Slurm has forgotten it). A failed
        query that is not "Invalid job id" (munge refusing a replayed credential, slurmctld
        busy: seen on a loaded machine) is tried again, a few times, before it counts as {}."""
        for attempt in range(5):
            res = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
            if res.returncode == 0 and res.stdout.strip():
                return parse_scontrol_record(res.stdout.splitlines()[0])
            if res.returncode == 0 or "Invalid job id" in (res.stderr or ""):
                return {}
            time.sleep(0.5 * (attempt + 1))
        return {}

    def state(self, job_id: int | str) -> str:
        """The job's state (``PENDING``, ``RUNNING``, ``COMPLETING``, ``COMPLETED``, ...).

        ``UNKNOWN`` when neither scontrol nor the completion log know the job.
        """
        record = self.job(job_id)
        if record:
            return record.get("JobState", "UNKNOWN")
        done = self.completions(job_id)
        return done[-1].get("JobState", "UNKNOWN") if done else "UNKNOWN"

    def completions(self, job_id: int | str) -> list[dict[str, str]]:
        """The job's records in the job-completion log (one per end: requeues included)."""
        try:
            lines = self.cluster.jobcomp_log.read_text(errors="replace").splitlines()
        except OSError:
            return []
        records = [parse_scontrol_record(line) for line in lines]
        return [r for r in records if r.get("JobId") == str(job_id)]

    def wait_for(
        self,
        job_id: int | str,
        states: Iterable[str],
        timeout: float = 60.0,
        poll: float = 0.5,
    ) -> str:
        """Wait until the job is in one of ``states`` (e.g. ``{"RUNNING"}``); return it.

        Raises :class:`SlurmJobTimeout` (with the job record and log tails) on timeout, or when
        the job ends in a state that is not awaited.
        """
        wanted = set(states)
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while True:
            state = self.state(job_id)
            if state in wanted:
                return state
            if state in TERMINAL_STATES:
                raise SlurmJobTimeout(
                    f"job {job_id} ended {state} while waiting for {sorted(wanted)}\n"
                    f"{self.describe(job_id)}"
                )
            if time.monotonic() > deadline:
                raise SlurmJobTimeout(
                    f"job {job_id} still {state} after {timeout:.0f} s "
                    f"(waiting for {sorted(wanted)})\n{self.describe(job_id)}"
                )
            time.sleep(poll)

    def wait(self, job_id: int | str, timeout: float = 120.0, poll: float = 0.5) -> str:
        """Wait until the job has ended for good; return its final state (``COMPLETED``, ...).

        A requeued job is followed through its restarts; ``COMPLETING`` (epilog, step
        cleanup) is not an end. Raises :class:`SlurmJobTimeout` after ``timeout`` seconds.
        """
        return self.wait_for(job_id, TERMINAL_STATES, timeout=timeout, poll=poll)

    def describe(self, job_id: int | str) -> str:
        """The job record, the queue and the daemons' log tails (for failure messages)."""
        record = self.run("scontrol", "show", "job", str(job_id), check=False)
        queue = self.run("squeue", check=False)
        return (
            f"--- scontrol show job {job_id} ---\n{record.stdout}{record.stderr}"
            f"--- squeue ---\n{queue.stdout}{queue.stderr}"
            f"--- completion log ---\n{self.completions(job_id)}\n"
            f"{self.cluster.log_tails(15)}"
        )


# -------------------------------------------------------------------- the fixture


def _external_cluster(conf: str) -> Cluster:
    directory = Path(conf).resolve().parent
    try:
        return Cluster.load(directory)
    except slurm_tool.ClusterError as err:
        raise pytest.UsageError(f"EVAV_SLURM_CONF={conf}: {err}") from None


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While the cluster runs, SIGTERM (e.g. a CI timeout) unwinds like Ctrl-C, so the
    fixture's teardown stops the cluster. Only when SIGTERM has its default handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="session")
def slurm_cluster(request: pytest.FixtureRequest) -> Iterator[SlurmHarness]:
    """A running local Slurm cluster (see the module docstring); stopped at session end."""
    external = os.environ.get("EVAV_SLURM_CONF")
    if external:
        yield SlurmHarness(_external_cluster(external))
        return
    missing = slurm_tool.missing_binaries()
    if missing:
        pytest.skip(
            f"Slurm/munge not installed (missing {' '.join(missing)}): "
            "run .ci/install_os_packages.sh or apt-get install slurm-wlm munge"
        )
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (its daemons run as root)")

    directory = Path(tempfile.mkdtemp(prefix="evav-slurm-", dir="/tmp"))
    cluster = slurm_tool.start(directory)  # raises ClusterError with log tails on failure

    def stop_once() -> None:
        with contextlib.suppress(Exception):
            slurm_tool.stop(cluster, quiet=True)

    atexit.register(stop_once)
    try:
        with _sigterm_as_interrupt():
            yield SlurmHarness(cluster)
    finally:
        slurm_tool.stop(cluster, quiet=True)
        atexit.unregister(stop_once)
        failed = getattr(request.session, "testsfailed", 0)
        if os.environ.get("EVAV_SLURM_KEEP") == "1" or failed:
            sys.stderr.write(f"\n[slurm_cluster] kept the cluster directory {directory}\n")
        else:
            shutil.rmtree(directory, ignore_errors=True)
