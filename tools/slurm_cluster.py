#!/usr/bin/env python3
"""A real Slurm cluster on this host, for tests and for trying evav's sbatch templates.

One command starts it, one stops it::

    python tools/slurm_cluster.py start [--dir DIR] [--nodes 2] [--cpus-per-node 4]
    export SLURM_CONF=DIR/slurm.conf          # printed by 'start'
    sbatch slurm/train.sbatch ...             # sbatch/srun/squeue/scontrol/scancel/sinfo
    python tools/slurm_cluster.py status [--dir DIR]
    python tools/slurm_cluster.py stop [--dir DIR]

What runs (all as root, all on 127.0.0.1, everything under DIR):

- ``munged`` with its own key and its own socket (never the system's munged or key),
- ``slurmctld`` and N ``slurmd -N nodeI`` daemons, each on its own free TCP port,
- ``slurm.conf`` in DIR; ``DIR/log`` holds every log, ``DIR/state`` the controller state,
  ``DIR/spool/nodeI`` each node's spool, ``DIR/run`` the pid files.

The configuration works inside a container without systemd or cgroups
(``proctrack/linuxproc``, ``task/none``, ``jobacct_gather/none``), has no accounting database
(so ``sacct`` does not work: use ``squeue``/``scontrol`` and the job-completion log
``DIR/log/jobcomp.log``), requeues jobs (``JobRequeue=1``) and keeps the controller's timers
short so that requeued and dependent jobs start within seconds. See ``docs/local_slurm.md``.

Tested with Slurm 22.05 and munge 0.5.15 from Debian 12 (``apt-get install slurm-wlm munge``).
The module is also imported by ``tests/slurm_fixtures.py``: :func:`start`, :func:`stop`,
:class:`Cluster`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: Marker put in every daemon's environment (inherited by slurmstepd): identifies, on stop,
#: exactly the processes this cluster started, never anyone else's.
MARKER_ENV = "EVAV_SLURM_CLUSTER"
#: Where ``start`` records the last cluster it started, for ``stop``/``status`` without --dir.
LAST_POINTER = Path(tempfile.gettempdir()) / "evav-slurm-last"
#: Binaries a cluster needs (daemons, then the clients the tests use).
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("munge", "sinfo", "sbatch", "srun", "squeue", "scontrol", "scancel")
#: Job states after which a job will not run again (squeue/scontrol names).
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
    }
)
#: Environment variables that steer Slurm clients; not passed on from the caller.
CLIENT_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SCANCEL_")
STATE_FILE = "cluster.json"
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


class ClusterError(RuntimeError):
    """The cluster could not be started, or is not running; the message says why."""


@dataclass
class Cluster:
    """A local cluster's layout: everything lives under :attr:`dir`."""

    dir: Path
    nodes: list[str]
    cpus_per_node: int
    real_memory_mb: int
    ctld_port: int
    node_ports: dict[str, int]
    munge_socket: Path
    started_at: float = 0.0
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        """The cluster's ``slurm.conf`` (point ``SLURM_CONF`` at it)."""
        return self.dir / "slurm.conf"

    @property
    def log_dir(self) -> Path:
        return self.dir / "log"

    @property
    def jobcomp_log(self) -> Path:
        """One line per finished (or requeued) job: ``JobId=.. JobState=..``."""
        return self.log_dir / "jobcomp.log"

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """A copy of ``base`` (default ``os.environ``) whose Slurm clients use this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        # SLURM_*/SBATCH_*/... inherited from an enclosing job or the user's shell (account,
        # partition, job id) would confuse sbatch/srun on this cluster.
        for key in [k for k in env if k.startswith(CLIENT_ENV_PREFIXES) and k != "SLURM_CONF"]:
            del env[key]
        env.pop(MARKER_ENV, None)
        return env

    def save(self) -> None:
        data = asdict(self)
        data["dir"] = str(self.dir)
        data["munge_socket"] = str(self.munge_socket)
        tmp = self.dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.dir / STATE_FILE)

    @classmethod
    def load(cls, directory: Path) -> Cluster:
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise ClusterError(f"no local Slurm cluster in {directory} ({path} is missing)")
        data = json.loads(path.read_text())
        data["dir"] = Path(data["dir"])
        data["munge_socket"] = Path(data["munge_socket"])
        return cls(**data)

    def log_tails(self, lines: int = 25) -> str:
        """The last lines of every log, for error messages."""
        parts = []
        for log in sorted(self.log_dir.glob("*")):
            if log.is_file() and log.stat().st_size:
                parts.append(f"--- {log} (last {lines} lines) ---\n{tail(log, lines)}")
        return "\n".join(parts) or f"(no logs in {self.log_dir})"


# --------------------------------------------------------------------------- helpers


def tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a text file ('' when it is absent)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def which(name: str) -> str | None:
    """Find a binary on PATH or in the sbin directories (not always on a root PATH in CI)."""
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN_DIRS)
    return shutil.which(name, path=path)


def missing_binaries() -> list[str]:
    """The Slurm/munge binaries this host lacks (empty when a cluster can run)."""
    return [name for name in DAEMONS + CLIENTS if which(name) is None]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _world_traversable(path: Path) -> bool:
    """True when every directory from / to ``path`` is executable by others (munged's rule)."""
    for p in [path, *path.parents]:
        try:
            if not p.stat().st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own exited child) is not alive; reap it when it is ours.
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _proc_environ_has(pid: int, entry: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return entry in f.read().split(b"\0")
    except OSError:
        return False


def _process_table() -> dict[int, int]:
    """pid -> parent pid for every visible process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                table[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return table


def _run_client(
    cluster: Cluster, argv: Sequence[str], timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    exe = which(argv[0]) or argv[0]
    return subprocess.run(
        [exe, *argv[1:]],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --------------------------------------------------------------------------- configuration


def render_slurm_conf(cluster: Cluster, cred_expire: int) -> str:
    """The ``slurm.conf`` text (Slurm 22.05 option names)."""
    d = cluster.dir
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 "
        f"Port={cluster.node_ports[name]} CPUs={cluster.cpus_per_node} "
        f"RealMemory={cluster.real_memory_mb} State=UNKNOWN"
        for name in cluster.nodes
    )
    return f"""\
# evav local Slurm cluster (tools/slurm_cluster.py); generated, do not edit: restart instead.
# {MARKER_ENV}={d}
ClusterName=evavlocal
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={cluster.ctld_port}
SlurmUser=root
SlurmdUser=root
MailProg=/bin/true

# Our own munged. cred_expire is also how long a requeued job waits before it may start again
# (default 120 s); short, so requeue tests take seconds.
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={cluster.munge_socket},cred_expire={cred_expire}

StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

# No systemd, no cgroups: works inside containers.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
# Nodes may declare more CPUs than the host has (oversubscription is fine for tests).
SlurmdParameters=config_overrides

# No slurmdbd: sacct does not work; finished jobs are logged here.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={d}/log/jobcomp.log

SchedulerType=sched/backfill
# Scheduling every 2 s (defaults 60/30 s): requeued and dependent jobs start promptly.
SchedulerParameters=sched_interval=2,bf_interval=2
# A job whose dependency can never be satisfied is cancelled instead of pending forever.
DependencyParameters=kill_invalid_depend
SelectType=select/cons_tres
SelectTypeParameters=CR_Core

JobRequeue=1
ReturnToService=2
# Finished jobs stay visible to scontrol/squeue for 5 minutes.
MinJobAge=300
KillWait=5
OverTimeLimit=0
InactiveLimit=0
Waittime=0
MessageTimeout=20
SlurmdTimeout=120

{nodes}
PartitionName=debug Nodes={",".join(cluster.nodes)} Default=YES MaxTime=INFINITE State=UP
"""


# --------------------------------------------------------------------------- start / stop


def _spawn(cluster: Cluster, name: str, argv: list[str]) -> int:
    """Start one daemon in the foreground of its own session; record and return its pid."""
    out = open(cluster.log_dir / f"{name}.stdout", "ab")  # noqa: SIM115 - handed to the child
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLIENT_ENV_PREFIXES)}
    env[MARKER_ENV] = str(cluster.dir)
    env["SLURM_CONF"] = str(cluster.conf)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cluster.dir,
            start_new_session=True,
        )
    finally:
        out.close()
    _CHILDREN[proc.pid] = proc
    cluster.pids[name] = proc.pid
    cluster.save()
    return proc.pid


#: Daemons started by this Python process, kept so that they are reaped (no zombies, no
#: ResourceWarning) when stopped from the same process (the pytest fixture).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _wait_until(
    cluster: Cluster, what: str, check: Callable[[], bool], timeout: float, watch: Iterable[str]
) -> None:
    """Poll ``check`` until true; fail early, with the logs, when a watched daemon dies."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        dead = [n for n in watch if not _pid_alive(cluster.pids.get(n, -1))]
        if dead:
            raise ClusterError(
                f"{', '.join(dead)} exited while waiting for {what}\n{cluster.log_tails()}"
            )
        if time.monotonic() > deadline:
            raise ClusterError(
                f"timed out after {timeout:.0f} s waiting for {what}\n{cluster.log_tails()}"
            )
        time.sleep(0.3)


def _node_states(cluster: Cluster) -> dict[str, str]:
    res = _run_client(cluster, ["sinfo", "-h", "-N", "-o", "%N %T"], timeout=10)
    if res.returncode != 0:
        return {}
    states = {}
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def _munge_socket_for(directory: Path) -> tuple[Path, Path | None]:
    """Socket path for munged: in DIR when munged accepts it there, else in a /tmp dir.

    munged refuses a socket whose every ancestor is not world-executable (``/root`` is 0700)
    and Unix socket paths are limited to 107 bytes.
    """
    run = directory / "munge" / "run"
    candidate = run / "munge.sock"
    if _world_traversable(directory.parent) and len(str(candidate)) < 100:
        return candidate, None
    extra = Path(tempfile.mkdtemp(prefix="evav-munge-", dir="/tmp"))
    extra.chmod(0o755)
    return extra / "munge.sock", extra


def start(
    directory: Path | str | None = None,
    nodes: int = 2,
    cpus_per_node: int = 4,
    real_memory_mb: int = 1024,
    cred_expire: int = 10,
    timeout: float = 60.0,
) -> Cluster:
    """Start munged, slurmctld and ``nodes`` slurmd daemons; return once every node is idle.

    ``directory`` (created if needed; default a new ``/tmp/evav-slurm-*``) holds everything.
    On any failure, whatever was started is stopped again and :class:`ClusterError` says what
    went wrong, with the daemons' log tails.
    """
    if os.geteuid() != 0:
        raise ClusterError("the local Slurm cluster runs its daemons as root: run this as root")
    missing = missing_binaries()
    if missing:
        raise ClusterError(
            f"missing binaries: {' '.join(missing)}; install them with "
            "'apt-get install -y slurm-wlm munge' (or .ci/install_os_packages.sh)"
        )
    if nodes < 1 or cpus_per_node < 1:
        raise ClusterError("need at least one node with at least one CPU")
    if directory is None:
        d = Path(tempfile.mkdtemp(prefix="evav-slurm-", dir="/tmp"))
    else:
        d = Path(directory).resolve()
        if any(c.isspace() for c in str(d)):
            raise ClusterError(f"the cluster directory may not contain whitespace: {d!r}")
        d.mkdir(parents=True, exist_ok=True)
    if (d / STATE_FILE).is_file():
        old = Cluster.load(d)
        if any(_pid_alive(p) and _is_ours(p, old) for p in old.pids.values()):
            raise ClusterError(f"a cluster is already running in {d}: stop it first")
        _cleanup_extra_dirs(old)
    for sub in ("state", "spool", "run", "log", "munge"):
        shutil.rmtree(d / sub, ignore_errors=True)
    d.chmod(0o755)
    for sub in ("state", "run", "log", "munge/etc", "munge/run"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "munge").chmod(0o755)
    (d / "munge" / "run").chmod(0o755)
    (d / "munge" / "etc").chmod(0o700)

    names = [f"node{i}" for i in range(1, nodes + 1)]
    for name in names:
        (d / "spool" / name).mkdir(parents=True)
    ports = free_ports(nodes + 1)
    munge_socket, _ = _munge_socket_for(d)
    cluster = Cluster(
        dir=d,
        nodes=names,
        cpus_per_node=cpus_per_node,
        real_memory_mb=real_memory_mb,
        ctld_port=ports[0],
        node_ports=dict(zip(names, ports[1:])),
        munge_socket=munge_socket,
        started_at=time.time(),
    )
    cluster.save()
    cluster.conf.write_text(render_slurm_conf(cluster, cred_expire))
    (d / "env.sh").write_text(f"export SLURM_CONF={cluster.conf}\n")

    try:
        _start_daemons(cluster, timeout)
    except BaseException:
        stop(cluster, quiet=True)
        raise
    return cluster


def _start_daemons(cluster: Cluster, timeout: float) -> None:
    d = cluster.dir
    key = d / "munge" / "etc" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    _spawn(
        cluster,
        "munged",
        [
            which("munged") or "munged",
            "--foreground",
            f"--socket={cluster.munge_socket}",
            f"--key-file={key}",
            f"--pid-file={d / 'run' / 'munged.pid'}",
            f"--log-file={d / 'log' / 'munged.log'}",
            f"--seed-file={d / 'munge' / 'etc' / 'munged.seed'}",
        ],
    )

    def munge_ok() -> bool:
        if not cluster.munge_socket.exists():
            return False
        enc = subprocess.run(
            [which("munge") or "munge", "-n", "-S", str(cluster.munge_socket)],
            capture_output=True,
            check=False,
        )
        return enc.returncode == 0

    _wait_until(cluster, "munged to answer", munge_ok, timeout, ["munged"])

    _spawn(cluster, "slurmctld", [which("slurmctld") or "slurmctld", "-D", "-f", str(cluster.conf)])

    def ctld_up() -> bool:
        res = _run_client(cluster, ["scontrol", "ping"], timeout=10)
        return res.returncode == 0 and "UP" in res.stdout

    _wait_until(cluster, "slurmctld to answer", ctld_up, timeout, ["munged", "slurmctld"])

    for name in cluster.nodes:
        _spawn(
            cluster,
            f"slurmd-{name}",
            [which("slurmd") or "slurmd", "-D", "-N", name, "-f", str(cluster.conf)],
        )
    daemons = list(cluster.pids)

    def all_idle() -> bool:
        states = _node_states(cluster)
        return all(states.get(n, "").rstrip("*") == "idle" for n in cluster.nodes)

    try:
        _wait_until(cluster, "every node to be idle (sinfo)", all_idle, timeout, daemons)
    except ClusterError as err:
        raise ClusterError(f"{err}\nnode states: {_node_states(cluster)}") from None


def _is_ours(pid: int, cluster: Cluster) -> bool:
    return _proc_environ_has(pid, f"{MARKER_ENV}={cluster.dir}".encode())


def _cleanup_extra_dirs(cluster: Cluster) -> None:
    sock_dir = cluster.munge_socket.parent
    if sock_dir.name.startswith("evav-munge-") and sock_dir.parent == Path("/tmp"):
        shutil.rmtree(sock_dir, ignore_errors=True)


def _cancel_all_jobs(cluster: Cluster, wait: float) -> None:
    """Cancel every job and give the steps a moment to end cleanly (needs slurmctld)."""
    if not _pid_alive(cluster.pids.get("slurmctld", -1)):
        return
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        res = _run_client(cluster, ["squeue", "-h", "-o", "%i"], timeout=10)
        jobs = res.stdout.split() if res.returncode == 0 else []
        if not jobs:
            return
        _run_client(cluster, ["scancel", *jobs], timeout=10)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            res = _run_client(cluster, ["squeue", "-h", "-o", "%i"], timeout=10)
            if res.returncode != 0 or not res.stdout.split():
                return
            time.sleep(0.5)


def stop(cluster: Cluster | Path | str | None = None, quiet: bool = False) -> list[int]:
    """Stop everything a cluster started, also after a partial start; return the pids ended.

    Running jobs are cancelled first. Then the daemons (from the recorded pids and pid files),
    every process carrying the cluster's marker (slurmstepd) and all their descendants (job
    processes) get SIGTERM, and SIGKILL after 5 s. Processes of other clusters or users are
    never touched: each candidate is checked to be a descendant of a process with this
    cluster's marker in its environment.
    """
    if not isinstance(cluster, Cluster):
        cluster = Cluster.load(resolve_dir(cluster))
    log = (lambda *_: None) if quiet else (lambda msg: print(msg, file=sys.stderr))
    _cancel_all_jobs(cluster, wait=10.0)

    marker = f"{MARKER_ENV}={cluster.dir}".encode()
    table = _process_table()
    roots = {p for p in cluster.pids.values() if p in table and _proc_environ_has(p, marker)}
    for pidfile in (cluster.dir / "run").glob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().split()[0])
            if pid in table and _proc_environ_has(pid, marker):
                roots.add(pid)
    roots |= {p for p in table if p != os.getpid() and _proc_environ_has(p, marker)}
    children: dict[int, list[int]] = {}
    for pid, ppid in table.items():
        children.setdefault(ppid, []).append(pid)
    family: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in family or pid == os.getpid():
            continue
        family.add(pid)
        todo.extend(children.get(pid, []))

    # Daemons first (slurmd before slurmctld before munged), then anything left.
    order = sorted(family, key=lambda p: _stop_rank(p, cluster))
    for pid in order:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(_pid_alive(p) for p in family):
        time.sleep(0.1)
    for pid in family:
        if _pid_alive(pid):
            log(f"[slurm_cluster] pid {pid} ignored SIGTERM: SIGKILL")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    for pid in family:
        proc = _CHILDREN.pop(pid, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
    _cleanup_extra_dirs(cluster)
    for pidfile in (cluster.dir / "run").glob("*.pid"):
        pidfile.unlink(missing_ok=True)
    cluster.pids = {}
    with contextlib.suppress(OSError):
        cluster.save()
    log(f"[slurm_cluster] stopped {len(family)} processes of the cluster in {cluster.dir}")
    return sorted(family)


def _stop_rank(pid: int, cluster: Cluster) -> int:
    names = {p: n for n, p in cluster.pids.items()}
    name = names.get(pid, "")
    if name.startswith("slurmd-"):
        return 1
    if name == "slurmctld":
        return 2
    if name == "munged":
        return 3
    return 0  # job processes and slurmstepd first


def resolve_dir(directory: Path | str | None) -> Path:
    """The cluster directory: the argument, $EVAV_SLURM_DIR, $SLURM_CONF's, or the last started."""
    if directory is not None:
        return Path(directory).resolve()
    if os.environ.get("EVAV_SLURM_DIR"):
        return Path(os.environ["EVAV_SLURM_DIR"]).resolve()
    conf = os.environ.get("SLURM_CONF")
    if conf and (Path(conf).parent / STATE_FILE).is_file():
        return Path(conf).parent.resolve()
    if LAST_POINTER.is_file():
        return Path(LAST_POINTER.read_text().strip())
    raise ClusterError("which cluster? give --dir DIR (no SLURM_CONF, no recently started one)")


def status(directory: Path | str | None = None) -> tuple[bool, str]:
    """(everything running, a human-readable report) for the cluster in ``directory``."""
    cluster = Cluster.load(resolve_dir(directory))
    lines = [f"cluster dir: {cluster.dir}", f"export SLURM_CONF={cluster.conf}"]
    ok = bool(cluster.pids)
    for name, pid in cluster.pids.items():
        alive = _pid_alive(pid) and _is_ours(pid, cluster)
        ok &= alive
        lines.append(f"  {name:<14} pid {pid:<8} {'running' if alive else 'NOT RUNNING'}")
    if not cluster.pids:
        lines.append("  (stopped)")
    if cluster.pids and _pid_alive(cluster.pids.get("slurmctld", -1)):
        res = _run_client(cluster, ["sinfo", "-N", "-o", "%N %T %c %m"], timeout=10)
        lines.append(res.stdout.rstrip() or res.stderr.rstrip())
        res = _run_client(cluster, ["squeue"], timeout=10)
        lines.append(res.stdout.rstrip() or res.stderr.rstrip())
    return ok, "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="slurm_cluster.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="start munged, slurmctld and the slurmd daemons")
    p_start.add_argument("--dir", type=Path, help="cluster directory (default: new /tmp dir)")
    p_start.add_argument("--nodes", type=int, default=2, help="number of slurmd nodes (2)")
    p_start.add_argument("--cpus-per-node", type=int, default=4, help="CPUs per node (4)")
    p_start.add_argument("--real-memory", type=int, default=1024, help="MB per node (1024)")
    p_start.add_argument(
        "--cred-expire",
        type=int,
        default=10,
        help="credential lifetime, s; also the wait before a requeued job restarts (10)",
    )
    p_start.add_argument("--timeout", type=float, default=60.0, help="start timeout, s (60)")
    for name, text in (
        ("stop", "stop everything the cluster started"),
        ("status", "show the daemons, nodes and jobs"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--dir", type=Path, help="cluster directory (default: the last started)")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            t0 = time.monotonic()
            cluster = start(
                args.dir,
                nodes=args.nodes,
                cpus_per_node=args.cpus_per_node,
                real_memory_mb=args.real_memory,
                cred_expire=args.cred_expire,
                timeout=args.timeout,
            )
            LAST_POINTER.write_text(f"{cluster.dir}\n")
            print(
                f"# local Slurm cluster up in {time.monotonic() - t0:.1f} s: "
                f"{len(cluster.nodes)} nodes x {cluster.cpus_per_node} CPUs, "
                f"logs in {cluster.log_dir}\n"
                f"# stop it with: python {sys.argv[0]} stop --dir {cluster.dir}\n"
                f"export SLURM_CONF={cluster.conf}"
            )
            return 0
        if args.command == "stop":
            stop(args.dir)
            return 0
        ok, report = status(args.dir)
        print(report)
        return 0 if ok else 1
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
