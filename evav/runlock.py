"""One trainer per run directory: an exclusive lock on ``RUN/.lock``, held for the process's life.

    stack.enter_context(runlock.hold(run_dir, denv.is_main))   # train(): before RUN is written

Rank 0 opens ``RUN/.lock`` and takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on it, keeping the
descriptor open until training ends: the kernel drops the lock when the process ends, however it
ends (``kill -9`` included), so a rerun after a crash and a Slurm requeue take it normally. Only
then does rank 0 write who holds it (host, pid, start time, Slurm job id and restart count) into
the file. A second trainer finds the lock taken and stops at once with ``RunInUseError`` (exit
status 2), naming the directory and the holder, before it has written anything. Every rank
learns the outcome from rank 0 (a broadcast after the process group is up), so no rank goes on
alone and none waits for a rank 0 that has stopped.

Shared filesystems. Ranks on other nodes see the run directory over a shared filesystem, where
flock may not reach across nodes: NFS (Linux >= 2.6.12) turns it into a lock on the server,
Lustre only when mounted with ``-o flock`` (``localflock`` keeps it on the node, ``noflock``
refuses it), other filesystems differ. So the holder record is checked as well: rank 0 refreshes
the file's mtime every ``HEARTBEAT_S`` while it holds the lock, and a record of *another host*
refreshed within ``STALE_S`` counts as a live holder even when flock succeeded, unless it is an
earlier run of this same Slurm job (a requeue: a higher ``SLURM_RESTART_COUNT`` now) or
``scontrol`` says its job has ended. Where flock is refused altogether (ENOLCK, EOPNOTSUPP) the
record alone decides. A clean end empties the record. A forked child (a DataLoader worker)
closes its copy of the descriptor at once, so the lock lives exactly as long as the trainer.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from evav.errors import BadInputError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0  # the holder refreshes the lock file's mtime this often
STALE_S = 120.0  # a record of another host older than this is a holder that has gone
REQUEUE_WAIT_S = 60.0  # how long a requeued job waits for its previous run to let go
_RECORD_MAX = 4096  # bytes of the record read; anything longer is not a record evav wrote
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_LIVE_SLURM_STATES = {
    "RUNNING",
    "COMPLETING",
    "CONFIGURING",
    "SUSPENDED",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
    "RESIZING",
}


_HELD: set[int] = set()  # descriptors of the locks this process holds


def _close_in_child() -> None:
    # flock belongs to the open file, which fork shares: a loader worker outliving a killed
    # trainer would keep the run locked. Closing the child's copy leaves the parent's lock.
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunInUseError(BadInputError):
    """Another trainer holds the run directory; the message names it and what to do."""

    def __init__(self, run_dir: str | Path, reason: str):
        super().__init__(run_dir, reason)
        self.args = (f"{self.path} {reason}",)  # "RUN is in use by ...", not "RUN: is in ..."


@dataclass
class Holder:
    """Who holds (or last held) a run lock, as its record says."""

    host: str
    pid: int
    started: str  # local time, YYYY-MM-DD HH:MM:SS
    slurm_job_id: str | None = None
    slurm_restart: int = 0
    refreshed: float = 0.0  # the lock file's mtime (unix time): the last heartbeat

    def describe(self) -> str:
        job = f" (Slurm job {self.slurm_job_id})" if self.slurm_job_id else ""
        return f"pid {self.pid} on host {self.host} since {self.started}{job}"


class RunLock:
    """The held lock of one run directory (rank 0's); ``release`` or process exit drops it."""

    def __init__(self, path: Path, fd: int, flock: bool):
        self.path = path
        self._fd = fd
        _HELD.add(fd)
        self.flock = flock  # False: the filesystem refused flock, the record alone guards
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="runlock", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self._fd)  # the mtime says "still here" to other nodes
            except OSError as e:  # a flaky filesystem: the next beat may work
                log.warning("run lock %s: cannot refresh its record: %s", self.path, e)

    def release(self) -> None:
        """Empty the record (nobody holds it now) and drop the lock. A second call does nothing."""
        if self._fd < 0:
            return
        self._stop.set()
        self._beat.join(5)
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass  # the lock still goes with the descriptor
        finally:
            _HELD.discard(self._fd)
            os.close(self._fd)
            self._fd = -1


def acquire(run_dir: str | Path) -> RunLock:
    """Take ``RUN/.lock`` for this process, creating RUN if needed; RunInUseError if held."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise BadInputError(run_dir, "run_dir is not a directory") from None
    except OSError as e:
        raise BadInputError(run_dir, f"cannot create the run directory: {e.strerror}") from None
    fd = _open_lock_file(path)
    try:
        flock = _flock(fd, path, run_dir)
        busy = _live_holder(_read_holder(fd), flock)
        if busy is not None:
            raise RunInUseError(run_dir, f"is in use by {busy}")
        _write_record(fd)
        if not flock:  # no kernel arbitration: the last of two simultaneous writers wins
            time.sleep(1.0)
            mine = _read_holder(fd)
            if mine is None or (mine.host, mine.pid) != (socket.gethostname(), os.getpid()):
                raise RunInUseError(
                    run_dir, f"is in use by {_describe(mine)} (it started at the same time)"
                )
    except BaseException:
        os.close(fd)  # never our record left behind: it was not written, or it is not ours
        raise
    return RunLock(path, fd, flock)


@contextlib.contextmanager
def hold(run_dir: str | Path, is_main: bool) -> Iterator[RunLock | None]:
    """Rank 0 takes the run lock; every rank raises what rank 0 hit (the lock is held, or the
    directory is unusable), so no rank starts without it. Released on exit."""
    from evav import distributed as dist

    lock, failure, error = None, None, None
    if is_main:
        try:
            lock = acquire(run_dir)
        except Exception as e:  # noqa: BLE001 - told to the other ranks first, then raised
            error = e
            if isinstance(e, BadInputError):
                failure = (isinstance(e, RunInUseError), e.path, e.reason)
            else:
                failure = (False, str(run_dir), f"cannot take the run lock: {e}")
    failure = dist.broadcast_object(failure)
    if error is not None:
        raise error
    if failure is not None:
        in_use, path, reason = failure
        raise (RunInUseError if in_use else BadInputError)(path, reason)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def read_holder(run_dir: str | Path) -> Holder | None:
    """The record of ``RUN/.lock`` (None: no lock file, empty, or not a record), read only."""
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        return _read_holder(fd) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    finally:
        os.close(fd)


# -- the pieces ------------------------------------------------------------------------------


def _open_lock_file(path: Path) -> int:
    """Open the lock file without following a link and without truncating it (a second trainer
    must leave the holder's record as it is); it must be a plain file with one name, so that
    writing the record can never touch a file elsewhere."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BadInputError(
                path, "is a symbolic link, not evav's run lock (remove it)"
            ) from None
        raise BadInputError(path, f"cannot open the run lock: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(st.st_mode) else "a file with other links"
        raise BadInputError(path, f"is {what}, not evav's run lock (remove it)")
    return fd


def _flock(fd: int, path: Path, run_dir: Path) -> bool:
    """Take the flock (True), or learn the filesystem has none (False); RunInUseError if held.
    A holder that is an earlier run of this Slurm job (a requeue) is waited for a while."""
    deadline = time.monotonic() + REQUEUE_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            holder = _read_holder(fd)
            if _earlier_run_of_this_job(holder) and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            raise RunInUseError(
                run_dir,
                f"is in use by {_describe(holder)}; another `evav train` holds its lock "
                f"{path}: wait for it to end or stop it, or use another run_dir",
            ) from None
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                raise BadInputError(path, f"cannot lock: {e.strerror}") from None
            log.warning(
                "run lock %s: this filesystem refuses flock (%s); relying on the holder record",
                path,
                e.strerror,
            )
            return False


def _live_holder(holder: Holder | None, flock: bool) -> str | None:
    """With the flock taken (or none to take): does the record still name a live holder?"""
    if holder is None or _earlier_run_of_this_job(holder):
        return None
    if holder.host == socket.gethostname():
        if flock:
            return None  # on one host the kernel's answer is the truth
        if holder.pid != os.getpid() and pid_alive(holder.pid):
            return f"{holder.describe()} (the filesystem has no flock; that pid is alive)"
        return None
    age = time.time() - holder.refreshed
    if age > STALE_S:
        return None
    if holder.slurm_job_id and _slurm_job_ended(holder.slurm_job_id):
        return None
    return (
        f"{holder.describe()}: its lock record was refreshed {max(age, 0):.0f} s ago from that "
        f"host, and file locks may not reach across nodes on this filesystem. Stop that trainer, "
        f"or, if it is gone, retry after {STALE_S:.0f} s without a refresh or delete "
        f"{LOCK_NAME} in the run directory"
    )


def _earlier_run_of_this_job(holder: Holder | None) -> bool:
    """The holder is this Slurm job before its requeue (same job id, lower restart count)."""
    job = os.environ.get("SLURM_JOB_ID")
    if holder is None or not job or holder.slurm_job_id != job:
        return False
    return _int(os.environ.get("SLURM_RESTART_COUNT"), 0) > holder.slurm_restart


def _write_record(fd: int) -> None:
    now = time.time()
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.fromtimestamp(now).strftime("%Y-%m-%d %H:%M:%S"),
        "started_unix": now,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart": _int(os.environ.get("SLURM_RESTART_COUNT"), 0),
        "slurm_node": os.environ.get("SLURMD_NODENAME"),
    }
    data = (json.dumps(record) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _read_holder(fd: int) -> Holder | None:
    """The record in the lock file; None when empty or not a record (any bytes may be there)."""
    try:
        raw = os.pread(fd, _RECORD_MAX + 1, 0)
        mtime = os.fstat(fd).st_mtime
    except OSError:
        return None
    if not raw or len(raw) > _RECORD_MAX:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    pid = data.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    job = data.get("slurm_job_id")
    return Holder(
        host=_text(data.get("host")) or "?",
        pid=pid,
        started=_text(data.get("started")) or "?",
        slurm_job_id=_text(job) if job is not None else None,
        slurm_restart=_int(data.get("slurm_restart"), 0),
        refreshed=mtime,
    )


def _describe(holder: Holder | None) -> str:
    if holder is None:
        return "another process (its lock record is empty or unreadable)"
    return holder.describe()


def _text(value: object) -> str:
    """A record field fit for a message: printable, at most 100 characters."""
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        return ""
    return "".join(c for c in str(value) if c.isprintable())[:100]


def _int(value: object, default: int) -> int:
    if isinstance(value, bool):
        return default
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _slurm_job_ended(job_id: str) -> bool:
    """True when Slurm says the job is over (or forgot it); False when it runs or nobody knows."""
    scontrol = shutil.which("scontrol")
    if scontrol is None or not job_id.isdigit():
        return False
    try:
        done = subprocess.run(
            [scontrol, "show", "job", "-o", job_id], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    if done.returncode != 0:
        return "invalid job id" in (done.stderr + done.stdout).lower()
    for field in done.stdout.split():
        if field.startswith("JobState="):
            return field.removeprefix("JobState=") not in _LIVE_SLURM_STATES
    return False
