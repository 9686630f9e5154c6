"""`evav status RUN` (evav/status.py) on real runs: a finished one (trained, checkpointed,
evaluated, logged to MLflow), one in progress (held at a step by ``EVAV_FAULT=hold:N``, then
stopped by SIGTERM with a checkpoint), a damaged checkpoint, and folders that are not runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import evav.train
from evav.metrics import read_metrics
from tests.test_export import finished_run  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[1]


def evav_status(*args, check=True):
    done = subprocess.run(
        [sys.executable, "-m", "evav.cli", "status", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def status_json(run: Path) -> dict:
    return json.loads(evav_status(run, "--json").stdout)


def test_status_of_a_finished_run(finished_run):  # noqa: F811
    from mlflow.tracking import MlflowClient

    root, _, run, results_path = finished_run
    s = status_json(run)
    assert s["run_dir"] == str(run) and s["state"] == "finished"
    assert (s["step"], s["steps"], s["progress"], s["eta_s"]) == (4, 4, 1.0, None)
    assert s["lock"]["running"] is False and s["lock"]["flock"] == "free"
    train = [r for r in read_metrics(run) if "train/loss" in r]
    assert s["loss"] == train[-1]["train/loss"] and s["loss_step"] == 4
    fps = [r["speed/frames_per_s"] for r in train]
    assert abs(s["frames_per_s"] - sum(fps) / len(fps)) < 1e-9
    dt = train[-1]["time"] - train[0]["time"]
    assert (
        abs(s["samples_per_s"] - (train[-1]["train/samples"] - train[0]["train/samples"]) / dt)
        < 1e-9
    )
    ck = s["checkpoint"]
    assert ck["path"] == str(run / "checkpoints" / "step_00000004") and ck["verified"]
    assert ck["step"] == 4 and ck["failing"] == [] and ck["set_aside"] == []
    results = json.loads(results_path.read_text())
    (ev,) = s["eval"]
    assert ev["path"] == str(results_path) and ev["step"] == 4
    assert ev["tasks"]["count"] == {
        "kind": "classification",
        "samples": 6,
        "metric": "accuracy",
        "value": results["tasks"]["count"]["accuracy"],
    }
    run_id = (run / "mlflow_run_id").read_text().strip()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    exp = MlflowClient(uri).get_run(run_id).info.experiment_id
    ml = s["mlflow"]
    assert (ml["run_id"], ml["tracking_uri"], ml["experiment_id"]) == (run_id, uri, exp)
    assert ml["link"] == f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{run_id}"
    assert ml["ui_command"] == f"mlflow ui --backend-store-uri {uri}"

    text = evav_status(run).stdout
    for line in [
        f"run         {run}",
        "state       finished",
        "step        4/4 (100%)",
        f"checkpoint  {run / 'checkpoints' / 'step_00000004'} (step 4, verified)",
        f"eval        step 4 {ev['dataset']}/{ev['split']}: add accuracy ",
        f"mlflow      run {run_id} at {uri}",
        f"/#/experiments/{exp}/runs/{run_id}",
    ]:
        assert line in text, f"{line!r} not in:\n{text}"
    assert "frames/s" in text and "samples/s" in text


def test_status_names_a_checkpoint_that_fails_and_changes_nothing(finished_run, tmp_path):  # noqa: F811
    _, _, run, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    newest = copy / "checkpoints" / "step_00000004"
    shard = next((newest / "engine").glob("*model_states.pt"))
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated: fails its size in COMPLETE
    s = status_json(copy)
    ck = s["checkpoint"]
    assert ck["path"] == str(copy / "checkpoints" / "step_00000002") and ck["verified"]
    assert [f["path"] for f in ck["failing"]] == [str(newest)]
    assert "size" in ck["failing"][0]["reason"]
    assert newest.is_dir()  # nothing set aside or renamed
    quick = json.loads(evav_status(copy, "--json", "--no-verify", "--no-mlflow").stdout)
    assert quick["checkpoint"]["path"] == str(newest) and not quick["checkpoint"]["verified"]
    assert quick["mlflow"]["experiment_id"] is None  # not asked


def test_status_of_a_run_in_progress_then_stopped(finished_run, tmp_path):  # noqa: F811
    _, shards, _, _ = finished_run
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "evav.cli", "train", "configs/debug.yaml"]
    cmd += [f"data.train=[{shards}]", f"run_dir={run}", "steps=8", "micro_batch=4"]
    cmd += ["log_every=1", "val_every=0", "ckpt_every=1", "metrics.enabled=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EVAV_FAULT": "hold:3"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while len([r for r in read_metrics(run) if "train/loss" in r]) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        s = status_json(run)  # held at the end of step 3, before its checkpoint
        assert s["state"] == "running" and s["lock"]["running"] and s["lock"]["flock"] == "held"
        assert s["lock"]["holder"]["pid"] == proc.pid
        assert (s["step"], s["steps"]) == (3, 8)
        assert s["steps_per_s"] > 0 and s["frames_per_s"] > 0 and s["samples_per_s"] > 0
        assert abs(s["eta_s"] - 5 / s["steps_per_s"]) < 1e-6
        assert s["checkpoint"]["path"] == str(run / "checkpoints" / "step_00000002")
        assert s["checkpoint"]["verified"] and s["eval"] == [] and s["mlflow"] is None
        text = evav_status(run).stdout
        assert f"state       running (pid {proc.pid} on host " in text, text
        assert "step        3/8 (38%), ETA " in text, text
        assert "eval        none yet" in text and "mlflow      no MLflow run recorded" in text
        # the status probe did not disturb the trainer's lock: a second trainer is refused
        second = subprocess.run(cmd, cwd=REPO, env={**env, "EVAV_FAULT": ""}, capture_output=True)
        assert second.returncode == 2 and b"is in use by pid" in second.stderr

        proc.send_signal(signal.SIGTERM)  # checkpoint at step 3, then exit
        code = proc.wait(300)
        # 75: stopped on a preemption signal after a checkpoint (evav.train.PREEMPTED_EXIT)
        assert code == getattr(evav.train, "PREEMPTED_EXIT", 0), proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    s = status_json(run)
    assert s["state"] == "stopped" and not s["lock"]["running"] and s["lock"]["holder"] is None
    assert (s["step"], s["eta_s"]) == (3, None)
    assert s["checkpoint"]["path"] == str(run / "checkpoints" / "step_00000003")
    assert "state       stopped (no process holds the run lock" in evav_status(run).stdout


def test_a_folder_that_is_not_a_run_is_a_one_line_error(finished_run, tmp_path):  # noqa: F811
    from evav.export import export

    _, _, run, _ = finished_run
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    exp = export(run, tmp_path / "export")
    step = run / "checkpoints" / "step_00000004"
    for path, reason in [
        (tmp_path / "empty", "not a run directory (no config.yaml, metrics.jsonl or checkpoints/"),
        (tmp_path / "nope", "no such directory"),
        (tmp_path / "file", "not a directory"),
        (exp, "an export (evav export), not a run directory"),
        (step, f"a checkpoint, not a run directory; give its run directory ({run})"),
    ]:
        done = evav_status(path, check=False)
        assert done.returncode == 2 and done.stdout == "", done.stderr
        assert done.stderr.startswith(f"evav status: error: {path}: {reason}"), done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_status_links_the_run_on_an_mlflow_server_and_a_dead_one_costs_seconds(
    finished_run,  # noqa: F811
    tmp_path,
):
    from mlflow.tracking import MlflowClient

    from tools.mlflow_server import start_server, stop_server

    _, shards, _, _ = finished_run
    run = tmp_path / "run"
    (tmp_path / "srv").mkdir()
    proc, uri = start_server(tmp_path / "srv" / "store")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "evav.cli", "train", "configs/debug.yaml"]
            + [f"data.train=[{shards}]", f"run_dir={run}", "steps=2", "micro_batch=4"]
            + ["log_every=1", "val_every=0", f"metrics.tracking_uri={uri}"],
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        run_id = (run / "mlflow_run_id").read_text().strip()
        exp = MlflowClient(uri).get_run(run_id).info.experiment_id
        s = status_json(run)
        assert s["mlflow"]["link"] == f"{uri}/#/experiments/{exp}/runs/{run_id}"
        assert s["mlflow"]["ui_command"] is None and s["mlflow"]["note"] is None
        assert f"{uri}/#/experiments/{exp}/runs/{run_id}" in evav_status(run).stdout
    finally:
        stop_server(proc)
    t0 = time.monotonic()
    s = status_json(run)  # the server is gone: one note, no retry loop
    assert time.monotonic() - t0 < 60
    assert s["mlflow"]["run_id"] == run_id and s["mlflow"]["link"] is None
    assert s["mlflow"]["note"].startswith("MLflow did not answer")
    assert s["state"] == "finished" and s["checkpoint"]["step"] == 2
