"""Preemption: catch the signal, checkpoint at the next step boundary, requeue under Slurm.

Slurm sends ``USR2`` (``#SBATCH --signal=USR2@120``) a grace period before the time limit, or
``scancel --signal=USR2`` does; a preempting scheduler sends ``TERM``. The handler only sets a
flag. The trainer checks it once per step, all ranks agree through a max all-reduce, every rank
saves the checkpoint, and then: on ``USR2`` under Slurm, rank 0 runs ``scontrol requeue`` so
the same job (same run directory, same MLflow run) starts again and resumes; on ``TERM`` the
process exits and whoever sent it decides what comes next.

The requeue is the last thing rank 0 does: Slurm may end the job as soon as it is requeued, so
the trainer calls ``requeue_slurm_job`` only after the checkpoint is committed and the metrics
logger has flushed to MLflow and closed the run (KILLED; the resumed job reopens it).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

log = logging.getLogger(__name__)


class Preemption:
    """Records the first preemption signal received."""

    def __init__(self, signals: tuple[str, ...] = ("SIGUSR2", "SIGTERM")):
        self.received: str | None = None
        self._previous = {}
        for name in signals:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            log.warning("received %s: will checkpoint at the end of this step", self.received)

    @property
    def requested(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def requeue_slurm_job(timeout_s: float = 60.0) -> bool:
    """``scontrol requeue $SLURM_JOB_ID``; False (with a log line) outside Slurm or on failure."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        log.warning("preempted outside Slurm: not requeueing; rerun the same command to resume")
        return False
    try:  # no shell; bounded, so an unreachable slurmctld cannot hang the grace period away
        done = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=timeout_s
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("scontrol requeue %s failed: %s", job, e)
        return False
    if done.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, done.stderr.strip())
        return False
    log.warning("requeued Slurm job %s; it will resume from the checkpoint just written", job)
    return True
