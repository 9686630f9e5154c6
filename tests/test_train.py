"""Training end to end: real DeepSpeed engines (1 and 2 CPU processes), checkpoints, resume,
faults, and the MLflow run across restarts (status, one history, immutable params, images).

The 2-process ZeRO 2/3 tests train on FSDD shards built once per session from a real subset of
../shared/datasets/fsdd (they skip, naming the folder, when the datasets are absent); the others
use the built-in synthetic suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evav import checkpoint
from evav.frames.write import MIN_FRAME_PX
from evav.metrics import read_metrics
from tools.mlflow_server import free_port

REPO = Path(__file__).resolve().parents[1]
ARGS = ["configs/debug.yaml", "log_every=1", "val_every=0", "micro_batch=4", "optim.warmup_steps=5"]
FSDD_TAKES = {5, 6, 7, 8}  # train-split takes (the official split: takes 0-4 test, 5-49 train)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "synthetic"
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


@pytest.fixture(scope="session")
def fsdd(datasets, tmp_path_factory):
    """FSDD train shards of 200 real recordings (every digit and speaker, takes 5-8): all 2,500
    take about two minutes to build on 2 busy cores, this subset about 15 s."""
    src = tmp_path_factory.mktemp("fsdd-src")
    (src / "recordings").mkdir()
    for wav in sorted((datasets / "fsdd" / "recordings").glob("*.wav")):
        if int(wav.stem.rsplit("_", 1)[1]) in FSDD_TAKES:
            (src / "recordings" / wav.name).symlink_to(wav)
    out = tmp_path_factory.mktemp("shards") / "fsdd"
    cmd = [
        sys.executable,
        "-m",
        "evav.cli",
        "preprocess",
        "fsdd",
        "--src",
        str(src),
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory):
    """A SQLite MLflow store, created here once so the training runs do not each migrate it."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


def run_train(run_dir, data, *extra, env=None, nproc=1, wait=True):
    cmd = [
        sys.executable,
        "-m",
        "evav.cli",
        "train",
        *ARGS,
        f"data.train=[{data}]",
        f"run_dir={run_dir}",
        "metrics.enabled=false",
        *extra,
    ]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
            *cmd[1:],
        ]
    e = {**os.environ, **(env or {})}
    if not wait:
        return subprocess.Popen(
            cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    done = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=600)
    return done


def losses(run_dir) -> dict[int, float]:
    out = {}
    for r in read_metrics(run_dir):
        if "train/loss" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice"
            out[r["step"]] = r["train/loss"]
    return out


def mlflow_args(uri):
    return ["metrics.enabled=true", f"metrics.tracking_uri={uri}", "metrics.close_timeout_s=120"]


def mlflow_run(uri, run_dir):
    """The run of ``run_dir`` in the store at ``uri`` and the steps of its train/loss history."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run((Path(run_dir) / "mlflow_run_id").read_text().strip())
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    return client, run, sorted(steps)


def test_resume_after_sigterm_is_bitwise_identical_in_one_mlflow_run(
    synthetic, mlflow_db, tmp_path
):
    full = run_train(tmp_path / "full", synthetic, "steps=16", "ckpt_every=0")
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    ref = losses(tmp_path / "full")
    assert sorted(ref) == list(range(1, 17))

    cut = tmp_path / "cut"
    # the trainer waits at the end of step 6 for the signal: a fast machine cannot finish first
    proc = run_train(
        cut,
        synthetic,
        "steps=16",
        "ckpt_every=0",
        "metrics.image_every=4",
        *mlflow_args(mlflow_db),
        env={"EVAV_FAULT": "hold:6"},
        wait=False,
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(losses(cut)) < 6:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]  # PREEMPTED_EXIT: checkpointed, rerun to resume
    cut_at = checkpoint.complete_checkpoints(cut)[-1][0]
    assert cut_at == 6, f"preempted checkpoint at {cut_at}"
    _, run, steps = mlflow_run(mlflow_db, cut)
    assert run.info.status == "KILLED" and steps == list(range(1, cut_at + 1)), out[-3000:]
    run_id = run.info.run_id

    # resumed with one param changed: the run keeps the first value (params are immutable)
    again = run_train(
        cut,
        synthetic,
        "steps=16",
        "ckpt_every=0",
        "metrics.image_every=4",
        "keep_last=3",
        *mlflow_args(mlflow_db),
    )
    assert again.returncode == 0, again.stdout[-3000:]
    assert "resumed from" in again.stdout
    assert losses(cut) == ref  # bitwise: floats compared exactly
    client, run, steps = mlflow_run(mlflow_db, cut)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert steps == list(range(1, 17))  # one continuous history, no step twice
    assert run.data.params["keep_last"] == "2" and run.data.params["steps"] == "16"
    assert run.data.tags["changed_param.keep_last"] == "3"
    assert [f.path for f in client.list_artifacts(run_id, "config")] == ["config/config.yaml"]

    # predicted vs true frames every 4 steps: true frames on top, predictions below
    pngs = sorted(p.name for p in (cut / "images" / "pred_vs_true").glob("*.png"))
    assert pngs == [f"step_{s:08d}.png" for s in (4, 8, 12, 16)]
    logged = client.list_artifacts(run_id, "images/pred_vs_true")
    assert sorted(Path(f.path).name for f in logged) == pngs
    sheet = np.asarray(Image.open(cut / "images" / "pred_vs_true" / pngs[-1]))
    # labelled (evav.frames.write.labelled_sheet): two rows of 64 px frames upscaled 3x, a title
    # and a label line each; at least 480 px wide
    scale = MIN_FRAME_PX // 64
    assert sheet.shape[0] > 2 * (64 + 2) * scale and sheet.shape[1] >= 480 and sheet.shape[2] == 3


def test_a_finished_run_extended_with_more_steps_follows_the_new_schedule(synthetic, tmp_path):
    """steps=4 ends its cosine at lr 0 (min_lr_ratio=0); rerun with steps=8, the first resumed
    update must use the new schedule's lr at step 4, not the 0 the old one left in the optimizer."""
    from evav.distributed import consolidated_state_dict

    run = tmp_path / "run"
    args = ["ckpt_every=1", "keep_last=8", "optim.min_lr_ratio=0", "optim.warmup_steps=1"]
    first = run_train(run, synthetic, "steps=4", *args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    more = run_train(run, synthetic, "steps=8", *args)
    assert more.returncode == 0 and "resumed from" in more.stdout, more.stdout[-3000:]
    lr = {r["step"]: r["train/lr"] for r in read_metrics(run) if "train/lr" in r}
    assert lr[4] == 0.0 and lr[5] > 0.0  # lr after each step's update: the schedule moved on
    w4, w5 = (
        consolidated_state_dict(run / "checkpoints" / f"step_{s:08d}", "engine") for s in (4, 5)
    )
    changed = [k for k in w4 if not torch.equal(w4[k], w5[k])]
    assert len(changed) == len(w4), f"update 5 left {len(w4) - len(changed)} tensors unchanged"


def test_kill_during_save_resumes_from_previous_checkpoint(synthetic, tmp_path):
    done = run_train(
        tmp_path / "r", synthetic, "steps=8", "ckpt_every=4", env={"EVAV_FAULT": "kill_in_save:8"}
    )
    assert done.returncode == -signal.SIGKILL
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path / "r")] == [4]
    assert (tmp_path / "r/checkpoints/step_00000008").is_dir()  # the torn save, uncommitted
    again = run_train(tmp_path / "r", synthetic, "steps=8", "ckpt_every=4")
    assert again.returncode == 0, again.stdout[-3000:]
    assert "step_00000004" in again.stdout and "resumed from" in again.stdout
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path / "r")] == [4, 8]
    assert checkpoint.verify(checkpoint.step_dir(tmp_path / "r", 8)).ok  # rewritten whole


def test_nan_losses_are_skipped_then_stop_with_a_clear_error(synthetic, mlflow_db, tmp_path):
    ok = run_train(
        tmp_path / "a", synthetic, "steps=6", "ckpt_every=0", env={"EVAV_FAULT": "nan_loss:3"}
    )
    assert ok.returncode == 0, ok.stdout[-3000:]
    records = read_metrics(tmp_path / "a")
    assert records[-1]["train/skipped_steps"] == 1
    # the skipped attempt has its own record at the step it attempted, before step 3 trains
    skip = [r for r in records if "train/loss" not in r and "train/skipped_steps" in r]
    assert [(r["step"], r["train/skipped_steps"]) for r in skip] == [(3, 1)]
    assert (
        "step 3: non-finite loss in a micro-batch (on this or another rank), step skipped "
        "(skipped steps 1/10)"
    ) in ok.stdout
    assert "step 6/6 | " in ok.stdout and "skipped samples 0 steps 1 |" in ok.stdout
    bad = run_train(
        tmp_path / "b",
        synthetic,
        "steps=10",
        "ckpt_every=2",
        "max_skipped_steps=3",
        *mlflow_args(mlflow_db),
        env={"EVAV_FAULT": "nan_loss:5,6,7,8"},
    )
    assert bad.returncode != 0
    assert "NonFiniteLossError" in bad.stderr and "max_skipped_steps=3" in bad.stderr
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path / "b")][-1] == 4
    good = checkpoint.step_dir(tmp_path / "b", 4)  # verified: the message names no torn save
    assert f"the last good checkpoint is {good}" in bad.stderr and checkpoint.verify(good).ok
    _, run, steps = mlflow_run(mlflow_db, tmp_path / "b")
    assert run.info.status == "FAILED" and steps == [1, 2, 3, 4]


@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_zero_bf16_learns_fsdd_and_logs_to_mlflow_server(fsdd, tmp_path, stage):
    from tools.mlflow_server import start_server, stop_server

    (tmp_path / "srv").mkdir()
    proc, uri = start_server(tmp_path / "srv" / "store")
    try:  # FSDD clips are 4 frames: task, spectrogram, separator, the digit's word
        done = run_train(
            tmp_path / "run",
            fsdd,
            "steps=30",
            f"engine.zero_stage={stage}",
            "data.clip_frames=4",
            "ckpt_every=0",
            "metrics.enabled=true",
            f"metrics.tracking_uri={uri}",
            "optim.lr=3e-3",
            nproc=2,
        )
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        loss = losses(tmp_path / "run")
        first, last = sum(loss[s] for s in range(1, 6)) / 5, sum(loss[s] for s in range(26, 31)) / 5
        assert last < 0.8 * first, f"loss did not decrease: {first:.3f} -> {last:.3f}"
        from mlflow.tracking import MlflowClient

        run_id = (tmp_path / "run" / "mlflow_run_id").read_text().strip()
        client = MlflowClient(uri)
        hist = client.get_metric_history(run_id, "train/loss")
        assert sorted(m.step for m in hist) == list(range(1, 31))
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        stop_server(proc)


def test_mlflow_down_training_completes_with_full_jsonl(synthetic, tmp_path):
    done = run_train(
        tmp_path / "r",
        synthetic,
        "steps=5",
        "ckpt_every=0",
        "metrics.enabled=true",
        "metrics.tracking_uri=http://127.0.0.1:9",
        "metrics.close_timeout_s=2",
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert sorted(losses(tmp_path / "r")) == [1, 2, 3, 4, 5]
    assert "unreachable" in done.stdout + done.stderr
