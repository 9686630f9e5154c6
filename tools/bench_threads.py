"""CPU threads per rank: evav's default (evav/threads.py) against torch's own (one intra-op
thread per core), on the same short debug training run.

    .venv/bin/python tools/bench_threads.py                # prints the table only
    .venv/bin/python tools/bench_threads.py --write        # and writes its section
    .venv/bin/python tools/bench_threads.py --steps 20 --repeats 2 --spinners 0,2

Builds a small synthetic dataset (`evav preprocess synthetic`) into a temporary folder, then
runs `evav train configs/debug.yaml` for --steps steps (no validation, no checkpoint, no
metrics) in a fresh run directory, --repeats times per variant, in turn (A B A B ...) so that a
busy spell on a shared machine hits both alike, once per --spinners value: that many busy-loop
processes (other work on the same cores, as on a shared node) run during each training run,
started 2 s before it:

- default: no OMP_NUM_THREADS, so evav.threads chooses (cores usable / ranks on the node, less
  loader workers and the cores the load average says other work keeps busy, at least one);
- cores: OMP_NUM_THREADS = the cores usable, what torch does by itself.

Reports each variant's median wall and CPU seconds of the whole process (start-up included) and
the ratio default / cores, with the load average before and after. Writes the section
``threads`` of docs/benchmarks.md (tools.benchlib.write_section) only with --write.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall s, CPU s of the child, the threads it logged) for one command, which must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    m = re.search(r"CPU threads per rank: (\d+)", done.stderr + done.stdout)
    return wall, cpu, m.group(1) if m else "?"


def spinners(n: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(2.0 if n else 0.0)
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def main(argv: list[str] | None = None) -> int:
    from tools.benchlib import BENCHMARKS_MD, machine, write_section

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--spinners", default="0,2", help="busy processes alongside, comma-separated")
    p.add_argument("--write", action="store_true", help="write the section in docs/benchmarks.md")
    p.add_argument("--out", type=Path, default=BENCHMARKS_MD)
    a = p.parse_args(argv)

    cores = len(os.sched_getaffinity(0))
    evav = [sys.executable, "-m", "evav.cli"]
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    variants = {"default": base, "cores": {**base, "OMP_NUM_THREADS": str(cores)}}
    loads = [int(x) for x in a.spinners.split(",")]
    load0 = os.getloadavg()
    got: dict[tuple[int, str], list[tuple[float, float, str]]] = {}
    with tempfile.TemporaryDirectory(prefix="evav-threads-") as tmp:
        data = Path(tmp) / "syn"
        run([*evav, "preprocess", "synthetic", "--out", str(data)], base)
        time.sleep(5.0)  # the build's CPU time out of the first cell's start-up look
        for load in loads:
            for i in range(a.repeats):
                for name, env in variants.items():
                    run_dir = Path(tmp) / f"run-{load}-{name}-{i}"
                    cmd = [
                        *evav, "train", str(REPO / "configs/debug.yaml"), f"data.train=[{data}]",
                        f"run_dir={run_dir}", f"steps={a.steps}", f"log_every={a.steps}",
                        "val_every=0", "ckpt_every=0", "keep_last=1", "metrics.enabled=false",
                    ]  # fmt: skip
                    spin = spinners(load)
                    try:
                        wall, cpu, n = run(cmd, env)
                    finally:
                        stop(spin)
                    got.setdefault((load, name), []).append((wall, cpu, n))
                    print(f"{load} busy, {name:8s} #{i + 1}: {n} thread(s), wall {wall:.1f} s")
    load1 = os.getloadavg()

    def med(key, j: int) -> float:
        return statistics.median(x[j] for x in got[key])

    rows = []
    for load in loads:
        for name in variants:
            k = (load, name)
            how = "evav.threads" if name == "default" else f"OMP_NUM_THREADS={cores}"
            threads = f"{how}: {', '.join(x[2] for x in got[k])}"
            ratio = med(k, 0) / med((load, "cores"), 0)
            rows.append(
                f"| {load} | {name} | {threads} | {med(k, 0):.1f} "
                f"| {min(x[0] for x in got[k]):.1f} | {max(x[0] for x in got[k]):.1f} "
                f"| {med(k, 1):.1f} | {ratio:.2f} |"
            )
    md = "\n".join(
        [
            "## CPU threads per rank: evav's default vs one per core (`tools/bench_threads.py`)",
            "",
            f"Machine: {machine()}; load average (1, 5, 15 min) "
            f"{', '.join(f'{x:.1f}' for x in load0)} before, "
            f"{', '.join(f'{x:.1f}' for x in load1)} after (the spinners included).",
            f"Command: `python tools/bench_threads.py --steps {a.steps} --repeats {a.repeats} "
            f"--spinners {a.spinners}` (one training process, `configs/debug.yaml`, {a.steps} "
            "steps, synthetic data, the variants in turn).",
            "",
            "| busy processes alongside | variant | threads (each run) | wall s (median) | min | max "
            "| CPU s (median) | wall / cores' |",
            "|---:|---|---|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    print(md)
    if a.write:
        write_section("threads", md, a.out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
