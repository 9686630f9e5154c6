"""CPU threads per training process: set deliberately, never left to each library's default.

PyTorch starts as many intra-op threads as the machine has cores in every process, so R ranks on
one node with W loader workers each ask for R x cores threads on cores they share; where other
work keeps some of those cores busy, OpenMP threads then wait on each other (docs/benchmarks.md,
threads: up to several times slower with one thread per core on a loaded machine).
Unless ``OMP_NUM_THREADS`` says otherwise (then it is obeyed as it is), each rank gets its share
of the cores it may run on, less one per loader worker (a worker decodes with one thread:
evav.codec) and less the cores that other work keeps busy now: measured over a quarter of a
second from /proc/stat, on this process's own CPUs only (a Slurm job's cgroup, not the node;
the load average would count the whole node and this process's own recent past), the node's
other starting ranks not counted as other work; at least one.
"""

from __future__ import annotations

import os
import time

import torch

WINDOW_S = 0.25  # how long busy_cores looks


def local_ranks() -> int:
    """Training processes on this node: torchrun's LOCAL_WORLD_SIZE, Slurm's tasks per node."""
    env = os.environ
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        if env.get(name, "").split("(")[0].isdigit():
            return max(1, int(env[name].split("(")[0]))
    tasks = env.get("SLURM_TASKS_PER_NODE", "")  # e.g. "2(x3)": 2 on each of 3 nodes
    if tasks.split("(")[0].isdigit():
        return max(1, int(tasks.split("(")[0]))
    return 1


def busy_cores(cpus: set[int], window: float = WINDOW_S) -> float | None:
    """How many of ``cpus`` were busy (not idle, not waiting on I/O) over ``window`` seconds,
    from /proc/stat; None where it cannot be read (not Linux)."""

    def sample() -> dict[int, tuple[int, int]]:
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                name, *ticks = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    t = [int(x) for x in ticks]
                    out[int(name[3:])] = (sum(t[:8]), t[3] + t[4])  # (all, idle + iowait)
        return out

    try:
        a = sample()
        time.sleep(window)
        b = sample()
    except (OSError, ValueError, IndexError):
        return None
    busy = 0.0
    for cpu, (total, idle) in b.items():
        if cpu in a and total > a[cpu][0]:
            busy += 1 - (idle - a[cpu][1]) / (total - a[cpu][0])
    return busy


def default_threads(num_workers: int, cores: int, ranks: int, busy: float) -> int:
    """Intra-op threads for one rank (see the module docstring): ``busy`` counts the node's
    other ranks, starting up alongside this one (about a core each), which are not other work."""
    ranks = max(1, ranks)
    share = cores // ranks - num_workers
    others = max(0.0, busy - (ranks - 1))
    idle = int(cores - round(others)) // ranks
    return max(1, min(share, idle))


def configure(num_workers: int) -> str:
    """Set this process's torch threads; returns what was set and why, for the log."""
    if os.environ.get("OMP_NUM_THREADS"):
        return f"{torch.get_num_threads()} (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})"
    cpus = os.sched_getaffinity(0)
    cores, ranks = len(cpus), local_ranks()
    busy = busy_cores(cpus)
    if busy is None:  # no /proc/stat: the load average, capped at what is ours to run on
        busy = min(float(cores), os.getloadavg()[0])
    n = default_threads(num_workers, cores, ranks, busy)
    torch.set_num_threads(n)
    return (
        f"{n} ({cores} cores usable, {busy:.1f} busy now, {ranks} rank(s) on this node, "
        f"{num_workers} loader worker(s) each; set OMP_NUM_THREADS to choose)"
    )
