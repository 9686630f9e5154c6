"""Check that a preempted and resumed `evav train` run logs the same losses as an uninterrupted one.

    python tools/check_resume.py [--preset S] [--steps 16] [--cut 6] [--workers 2] [extra key=value ...]

On CPU, tests/test_train.py checks this bit for bit. This script runs the same check wherever it
is started (on a GPU machine it trains on the GPU): synthetic shards are built into a temporary
folder, run A trains ``--steps`` steps, run B is held at the end of step ``--cut``
(``EVAV_FAULT=hold:N``), sent SIGTERM (it checkpoints and exits 75) and rerun to the end. It
prints each step's two losses and whether they are bitwise equal, and exits 1 if they are not.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evav.metrics import read_metrics  # noqa: E402
from tools.bench_train import build_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="S")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--cut", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("extra", nargs="*", help="more key=value overrides for both runs")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="check_resume-") as tmp:
        data = build_data(Path(tmp))  # synthetic shards, as the training bench
        args = [
            sys.executable,
            "-m",
            "evav.cli",
            "train",
            "configs/debug.yaml",
            f"data.train=[{data}]",
            f"model.preset={a.preset}",
            f"steps={a.steps}",
            f"data.num_workers={a.workers}",
            "log_every=1",
            "val_every=0",
            "ckpt_every=0",
            "metrics.enabled=false",
            "metrics.image_every=0",
            *a.extra,
        ]
        full, cut = Path(tmp) / "full", Path(tmp) / "cut"
        subprocess.run([*args, f"run_dir={full}"], cwd=REPO, check=True)
        proc = subprocess.Popen(
            [*args, f"run_dir={cut}"], cwd=REPO, env={**os.environ, "EVAV_FAULT": f"hold:{a.cut}"}
        )
        deadline = time.time() + 600
        while time.time() < deadline and len(losses(cut)) < a.cut and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        if proc.wait(timeout=600) != 75:
            sys.exit(f"check_resume: the held run exited {proc.returncode}, not 75 (preempted)")
        subprocess.run([*args, f"run_dir={cut}"], cwd=REPO, check=True)
        ref, got = losses(full), losses(cut)
    same = True
    for step in sorted(ref):
        eq = ref[step] == got.get(step)
        same &= eq
        print(
            f"step {step:3d}  uninterrupted {ref[step]:.9g}  resumed {got.get(step, float('nan')):.9g}"
            f"  {'equal' if eq else 'DIFFERENT'}"
        )
    print(f"resume at step {a.cut}: {'bitwise identical' if same else 'NOT identical'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
