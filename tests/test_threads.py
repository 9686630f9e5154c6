"""evav.threads: the CPU threads each training rank gets (docs/benchmarks.md, threads)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from evav import threads


@pytest.mark.parametrize(
    ("workers", "cores", "ranks", "busy", "want"),
    [
        (0, 2, 1, 0.0, 2),  # idle: every core
        (0, 2, 1, 2.0, 1),  # both cores kept busy by other work: one thread, never zero
        (0, 16, 2, 1.0, 8),  # the other rank starting up is not other work
        (0, 16, 2, 9.0, 4),  # 8 cores busy with other work: half the 8 left each
        (2, 16, 2, 0.0, 6),  # each of its 2 loader workers takes a core
        (3, 4, 2, 0.0, 1),  # more workers than its share: still one
    ],
)
def test_default_threads(workers, cores, ranks, busy, want):
    assert threads.default_threads(workers, cores, ranks, busy) == want


def test_local_ranks_from_torchrun_and_slurm(monkeypatch):
    for k in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        monkeypatch.delenv(k, raising=False)
    assert threads.local_ranks() == 1
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "4(x3)")
    assert threads.local_ranks() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads.local_ranks() == 2


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc/stat")
def test_busy_cores_sees_a_spinning_process_on_its_cpu():
    cpu = min(os.sched_getaffinity(0))
    spin = subprocess.Popen(
        [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"]
    )
    try:
        busy = [threads.busy_cores({cpu}, window=0.5) for _ in range(3)]
    finally:
        spin.kill()
        spin.wait()
    assert max(busy) > 0.8, busy  # the spinner keeps it busy (other jobs can only add)
    assert all(0.0 <= b <= 1.0 + 1e-9 for b in busy), busy


def test_omp_num_threads_is_obeyed_as_it_is():
    code = "from evav import threads; import torch; print(threads.configure(0)); print(torch.get_num_threads())"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == ["1 (OMP_NUM_THREADS=1)", "1"]


def test_default_is_logged_with_its_reasons():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    code = "from evav import threads; import torch; print(threads.configure(1)); print(torch.get_num_threads())"
    line, n = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert line.startswith(f"{n} (") and "busy now" in line and "1 loader worker(s)" in line
    assert 1 <= int(n) <= len(os.sched_getaffinity(0))
