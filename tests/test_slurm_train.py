"""slurm/train.sbatch on a real (local) Slurm cluster: 2 nodes x 1 task, DeepSpeed over gloo.

Needs the ``slurm_cluster`` fixture (tests/slurm_fixtures.py: skips without Slurm/munge or root).
The jobs run the repo's python (EVAV_PYTHON=sys.executable) from the repo (EVAV_REPO).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from evav.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "train.sbatch"
ARGS = ["log_every=1", "val_every=0", "micro_batch=4", "optim.warmup_steps=5",
        "metrics.enabled=true"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm-shards") / "synthetic"
    subprocess.run([sys.executable, "-m", "evav.cli", "preprocess", "synthetic", "--out", str(out),
                    "train_per_task=40", "val_per_task=8"], check=True, cwd=REPO,
                   capture_output=True)
    return out


def submit(cluster, run_dir: Path, shards: Path, *overrides: str, opts=()) -> tuple[int, Path]:
    out = run_dir.parent / f"{run_dir.name}-%j.out"
    job = cluster.sbatch(
        SCRIPT, "--nodes=2", "--ntasks-per-node=1", "--time=10", f"--output={out}",
        f"--job-name=test-{run_dir.name}", *opts,
        script_args=[f"data.train=[{shards}]", *ARGS,
                     f"metrics.tracking_uri=sqlite:///{run_dir.parent / 'mlflow.db'}", *overrides],
        cwd=REPO,
        env={"CONFIG": "configs/debug.yaml", "RUN_DIR": str(run_dir), "EVAV_REPO": str(REPO),
             "EVAV_PYTHON": sys.executable},
    )
    return job, Path(str(out).replace("%j", str(job)))


def steps_logged(run_dir: Path) -> list[int]:
    try:
        return [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    except (OSError, ValueError):  # not there yet, or a line being written
        return []


def mlflow_runs(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    exps = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(exps)


def check_finished(cluster, job: int, run_dir: Path, out: Path, steps: int) -> str:
    text = out.read_text(errors="replace")
    assert steps_logged(run_dir) == list(range(1, steps + 1)), text[-4000:]
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    client, runs = mlflow_runs(run_dir)
    assert [r.info.run_id for r in runs] == [run_id]
    hist = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in hist) == list(range(1, steps + 1))
    return text


def test_two_node_job_trains_to_the_end(slurm_cluster, shards, tmp_path):
    run_dir = tmp_path / "run"
    job, out = submit(slurm_cluster, run_dir, shards, "steps=20", "ckpt_every=0")
    state = slurm_cluster.wait(job, timeout=240)
    text = out.read_text(errors="replace") if out.exists() else "(no output)"
    assert state == "COMPLETED", text[-4000:] + slurm_cluster.describe(job)
    assert slurm_cluster.job(job).get("NodeList") == "node[1-2]"
    assert "(2 tasks), master 127.0.0.1:" in text
    check_finished(slurm_cluster, job, run_dir, out, 20)


def test_usr2_checkpoints_requeues_and_resumes_in_the_same_run(slurm_cluster, shards, tmp_path):
    run_dir = tmp_path / "run"
    job, out = submit(slurm_cluster, run_dir, shards, "steps=60", "ckpt_every=0")
    deadline = time.monotonic() + 180
    # a few steps logged, and the MLflow run created (by the logger's background thread)
    while len(steps_logged(run_dir)) < 5 or not (run_dir / "mlflow_run_id").is_file():
        assert time.monotonic() < deadline, slurm_cluster.describe(job)
        assert slurm_cluster.state(job) in {"PENDING", "CONFIGURING", "RUNNING"}, \
            slurm_cluster.describe(job)
        time.sleep(0.3)
    first_run_id = (run_dir / "mlflow_run_id").read_text().strip()
    slurm_cluster.scancel("--signal=USR2", str(job))

    state = slurm_cluster.wait(job, timeout=240)
    text = out.read_text(errors="replace") if out.exists() else "(no output)"
    assert state == "COMPLETED", text[-6000:] + slurm_cluster.describe(job)
    assert slurm_cluster.job(job).get("Restarts") == "1", slurm_cluster.describe(job)
    assert "restart 0 on" in text and "restart 1 on" in text, text[-6000:]
    assert "DUE TO JOB REQUEUE" in text, text[-6000:]
    assert "resumed from" in text, text[-6000:]
    assert (run_dir / "mlflow_run_id").read_text().strip() == first_run_id
    check_finished(slurm_cluster, job, run_dir, out, 60)
    cut = int(text.split("resumed from")[1].split("at step")[1].split()[0])
    assert 5 <= cut < 60, f"resumed at step {cut}"
