"""slurm/train.sbatch on a real (local) Slurm cluster: 2 nodes x 1 task, DeepSpeed over gloo.

Needs the ``slurm_cluster`` fixture (tests/slurm_fixtures.py: skips without Slurm/munge or root).
The jobs run the repo's python (EVAV_PYTHON=sys.executable) from the repo (EVAV_REPO).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evav.metrics import read_metrics
from tests.slurm_fixtures import parse_scontrol_record

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "train.sbatch"
CONFIG = str(REPO / "configs" / "debug.yaml")
ARGS = [
    "log_every=1",
    "val_every=0",
    "micro_batch=4",
    "optim.warmup_steps=5",
    "metrics.enabled=true",
]


@pytest.fixture(scope="session")
def slurm_shards(tmp_path_factory) -> Path:
    """Synthetic shards (200 train + 40 val clips) for the Slurm jobs, built once per session:
    other modules import this fixture and find the finished build in the session's temp dir."""
    out = tmp_path_factory.getbasetemp() / "slurm-shards" / "synthetic"
    if not (out / "manifest.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "evav.cli",
                "preprocess",
                "synthetic",
                "--out",
                str(out),
                "train_per_task=40",
                "val_per_task=8",
            ],
            check=True,
            cwd=REPO,
            capture_output=True,
        )
    return out


def submit(
    cluster, run_dir: Path, shards: Path, *overrides: str, opts=(), fault: str = ""
) -> tuple[int, Path]:
    out = run_dir.parent / f"{run_dir.name}-%j.out"
    job = cluster.sbatch(
        SCRIPT,
        "--nodes=2",
        "--ntasks-per-node=1",
        "--time=10",
        f"--output={out}",
        f"--job-name=test-{run_dir.name}",
        *opts,
        script_args=[
            f"data.train=[{shards}]",
            *ARGS,
            f"metrics.tracking_uri=sqlite:///{run_dir.parent / 'mlflow.db'}",
            *overrides,
        ],
        cwd=REPO,
        env={
            "CONFIG": CONFIG,
            "RUN_DIR": str(run_dir),
            "EVAV_REPO": str(REPO),
            "EVAV_WORKDIR": str(run_dir.parent),  # MLflow's ./mlruns goes there, not in the repo
            "EVAV_PYTHON": sys.executable,
            "EVAV_FAULT": fault,  # evav/faults.py; sbatch passes the environment on
        },
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
    assert client.get_run(run_id).info.status == "FINISHED"
    return text


def test_two_node_job_trains_to_the_end(slurm_cluster, slurm_shards, tmp_path):
    run_dir = tmp_path / "run"
    job, out = submit(slurm_cluster, run_dir, slurm_shards, "steps=20", "ckpt_every=0")
    state = slurm_cluster.wait(job, timeout=240)
    text = out.read_text(errors="replace") if out.exists() else "(no output)"
    assert state == "COMPLETED", text[-4000:] + slurm_cluster.describe(job)
    assert slurm_cluster.job(job).get("NodeList") == "node[1-2]"
    assert "(2 tasks), master 127.0.0.1:" in text
    check_finished(slurm_cluster, job, run_dir, out, 20)


def test_usr2_checkpoints_requeues_and_resumes_in_the_same_run(
    slurm_cluster, slurm_shards, tmp_path
):
    run_dir = tmp_path / "run"
    # the trainers wait at the end of step 5 for the signal, so a fast machine cannot finish first
    job, out = submit(
        slurm_cluster, run_dir, slurm_shards, "steps=60", "ckpt_every=0", fault="hold:5"
    )
    deadline = time.monotonic() + 180
    # a few steps logged, and the MLflow run created (by the logger's background thread)
    while len(steps_logged(run_dir)) < 5 or not (run_dir / "mlflow_run_id").is_file():
        assert time.monotonic() < deadline, slurm_cluster.describe(job)
        assert slurm_cluster.state(job) in {"PENDING", "CONFIGURING", "RUNNING"}, (
            slurm_cluster.describe(job)
        )
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
    assert cut == 5, f"resumed at step {cut}"


def eval_result(run_dir: Path, data, step: int) -> Path:
    """The one results file `evav eval` wrote for checkpoint ``step`` on dataset ``data``:
    RUN/eval/<data folder name>/<split>/step_N.json (the split is eval's default)."""
    found = sorted((run_dir / "eval" / Path(data).name).glob(f"*/step_{step:08d}.json"))
    assert len(found) == 1, sorted(str(p) for p in (run_dir / "eval").rglob("*.json"))
    return found[0]


def evav_submit(
    cluster, cwd: Path, *args: str, check: bool = True, fault: str = ""
) -> tuple[subprocess.CompletedProcess, list[int]]:
    """``evav submit ARGS`` against the cluster; (the process, the job ids).

    ``cwd`` becomes the jobs' working directory (EVAV_WORKDIR): a temporary one, so that what
    they write relative to it (MLflow's ./mlruns artifact store) stays out of the repo.
    """
    res = subprocess.run(
        [sys.executable, "-m", "evav.cli", "submit", *map(str, args)],
        cwd=cwd,
        env={**cluster.env, "EVAV_FAULT": fault},  # sbatch passes the environment to the job
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res, [int(j) for j in re.findall(r"^submitted \w+ job (\d+)", res.stdout, re.M)]


def clock(text: str, pattern: str) -> int:
    """Seconds since midnight of the HH:MM:SS that ``pattern`` (one group) finds in ``text``."""
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in the job output:\n{text[-4000:]}"
    h, mi, s = map(int, m.group(1).split(":"))
    return h * 3600 + mi * 60 + s


def test_time_limit_warning_checkpoints_requeues_and_resumes(slurm_cluster, slurm_shards, tmp_path):
    """A 2-minute job with ``--signal=B:USR2@85`` (rendered by `evav submit --time 2
    --signal-grace 85`): Slurm warns the batch shell 55 to 85 s before the limit, it forwards
    USR2 to the trainers, which checkpoint; rank 0 requeues the job, which resumes in the same
    run dir and MLflow run and ends with 100 steps, none missing or repeated. The evaluation
    chained with afterok runs once, after the last run, on the final checkpoint."""
    run_dir = tmp_path / "run"
    res, jobs = evav_submit(
        slurm_cluster,
        tmp_path,
        CONFIG,
        f"data.train=[{slurm_shards}]",
        *ARGS,
        "steps=100",
        "ckpt_every=0",
        f"metrics.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "--run-dir",
        run_dir,
        "--nodes",
        "2",
        "--time",
        "2",
        "--signal-grace",
        "85",
        "--eval-data",
        slurm_shards,
        "--eval-limit",
        "1",
        "--job-name",
        "test-time-limit",
        # the trainers wait at the end of step 10 for the warning (unless it came sooner), so a
        # fast machine cannot finish the 100 steps before Slurm sends it
        fault="hold:10",
    )
    assert len(jobs) == 2, res.stdout
    job, eval_job = jobs
    assert "#SBATCH --signal=B:USR2@85" in (run_dir / "train.sbatch").read_text()
    deadline = time.monotonic() + 240
    while slurm_cluster.job(job).get("Restarts", "0") == "0":
        assert time.monotonic() < deadline, slurm_cluster.describe(job)
        assert slurm_cluster.state(job) in {
            "PENDING",
            "CONFIGURING",
            "RUNNING",
            "COMPLETING",
            "REQUEUED",
        }, slurm_cluster.describe(job)
        time.sleep(0.3)
    # Slurm gives the requeued job a fresh 2-minute limit, so it would be warned (and requeued)
    # again; a real job has hours left. Give the rest of the run the time it needs.
    slurm_cluster.scontrol("update", f"JobId={job}", "TimeLimit=10")

    state = slurm_cluster.wait(job, timeout=300)
    out = run_dir / f"slurm-{job}.out"
    text = out.read_text(errors="replace") if out.exists() else "(no output)"
    assert state == "COMPLETED", text[-6000:] + slurm_cluster.describe(job)
    assert slurm_cluster.job(job).get("Restarts") == "1", slurm_cluster.describe(job)
    started = clock(text, r"(\d\d:\d\d:\d\d) evav-train: job \d+ restart 0 ")
    warned = clock(text, r"evav-train: got USR2 at (\d\d:\d\d:\d\d) \(time-limit warning")
    assert 0 <= warned - started < 120, f"warning {warned - started} s after the start"
    assert text.count("sent USR2 to") == 2, text[-6000:]  # one trainer on each node
    assert "DUE TO JOB REQUEUE" in text and "restart 1 on" in text, text[-6000:]
    cut = int(text.split("resumed from")[1].split("at step")[1].split()[0])
    assert 1 <= cut <= 10, f"resumed at step {cut}"
    assert "DUE TO TIME LIMIT" not in text, text[-6000:]
    check_finished(slurm_cluster, job, run_dir, out, 100)

    assert slurm_cluster.wait(eval_job, timeout=180) == "COMPLETED", slurm_cluster.describe(
        eval_job
    )
    done = {
        r["JobId"]: r
        for r in (
            parse_scontrol_record(line)
            for line in slurm_cluster.cluster.jobcomp_log.read_text().splitlines()
        )
    }
    assert done[str(eval_job)]["StartTime"] >= done[str(job)]["EndTime"]
    results = json.loads(eval_result(run_dir, slurm_shards, 100).read_text())
    assert results["step"] == 100 and results["tasks"], results
