"""Training end to end: real DeepSpeed engines (1 and 2 CPU processes), checkpoints, resume, faults."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evav import checkpoint
from evav.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
ARGS = ["configs/debug.yaml", "log_every=1", "val_every=0", "micro_batch=4", "optim.warmup_steps=5"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "synthetic"
    subprocess.run([sys.executable, "-m", "evav.cli", "preprocess", "synthetic", "--out", str(out),
                    "train_per_task=40", "val_per_task=8"], check=True, cwd=REPO, capture_output=True)
    return out


def run_train(run_dir, data, *extra, env=None, nproc=1, wait=True):
    cmd = [sys.executable, "-m", "evav.cli", "train", *ARGS, f"data.train=[{data}]", f"run_dir={run_dir}",
           "metrics.enabled=false", *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000), *cmd[1:]]
    e = {**os.environ, **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=600)
    return done


def losses(run_dir) -> dict[int, float]:
    out = {}
    for r in read_metrics(run_dir):
        if "train/loss" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice"
            out[r["step"]] = r["train/loss"]
    return out


def test_resume_after_sigterm_is_bitwise_identical(synthetic, tmp_path):
    full = run_train(tmp_path / "full", synthetic, "steps=16", "ckpt_every=0")
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    ref = losses(tmp_path / "full")
    assert sorted(ref) == list(range(1, 17))

    proc = run_train(tmp_path / "cut", synthetic, "steps=16", "ckpt_every=0", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and len(losses(tmp_path / "cut")) < 6:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    cut_at = checkpoint.complete_checkpoints(tmp_path / "cut")[-1][0]
    assert 6 <= cut_at < 16, f"preempted checkpoint at {cut_at}"
    again = run_train(tmp_path / "cut", synthetic, "steps=16", "ckpt_every=0")
    assert again.returncode == 0, again.stdout[-3000:]
    assert "resumed from" in again.stdout
    assert losses(tmp_path / "cut") == ref  # bitwise: floats compared exactly


def test_kill_during_save_resumes_from_previous_checkpoint(synthetic, tmp_path):
    done = run_train(tmp_path / "r", synthetic, "steps=8", "ckpt_every=4",
                     env={"EVAV_FAULT": "kill_in_save:8"})
    assert done.returncode == -signal.SIGKILL
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path / "r")] == [4]
    assert (tmp_path / "r/checkpoints/step_00000008").is_dir()  # the torn save, uncommitted
    again = run_train(tmp_path / "r", synthetic, "steps=8", "ckpt_every=4")
    assert again.returncode == 0, again.stdout[-3000:]
    assert "step_00000004" in again.stdout and "resumed from" in again.stdout
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path / "r")] == [4, 8]


def test_nan_losses_are_skipped_then_stop_with_a_clear_error(synthetic, tmp_path):
    ok = run_train(tmp_path / "a", synthetic, "steps=6", "ckpt_every=0", env={"EVAV_FAULT": "nan_loss:3"})
    assert ok.returncode == 0, ok.stdout[-3000:]
    assert read_metrics(tmp_path / "a")[-1]["train/skipped_steps"] == 1
    bad = run_train(tmp_path / "b", synthetic, "steps=10", "ckpt_every=2", "max_skipped_steps=3",
                    env={"EVAV_FAULT": "nan_loss:5,6,7,8"})
    assert bad.returncode != 0
    assert "NonFiniteLossError" in bad.stderr and "max_skipped_steps=3" in bad.stderr
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path / "b")][-1] == 4


@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_zero_bf16_learns_and_logs_to_mlflow_server(synthetic, tmp_path, stage):
    from tools.mlflow_server import start_server, stop_server

    (tmp_path / "srv").mkdir()
    proc, uri = start_server(tmp_path / "srv" / "store")
    try:
        done = run_train(tmp_path / "run", synthetic, "steps=30", f"engine.zero_stage={stage}",
                         "ckpt_every=0", "metrics.enabled=true", f"metrics.tracking_uri={uri}",
                         "optim.lr=3e-3", nproc=2)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        loss = losses(tmp_path / "run")
        first, last = sum(loss[s] for s in range(1, 6)) / 5, sum(loss[s] for s in range(26, 31)) / 5
        assert last < 0.8 * first, f"loss did not decrease: {first:.3f} -> {last:.3f}"
        from mlflow.tracking import MlflowClient

        run_id = (tmp_path / "run" / "mlflow_run_id").read_text().strip()
        hist = MlflowClient(uri).get_metric_history(run_id, "train/loss")
        assert sorted(m.step for m in hist) == list(range(1, 31))
    finally:
        stop_server(proc)


def test_mlflow_down_training_completes_with_full_jsonl(synthetic, tmp_path):
    done = run_train(tmp_path / "r", synthetic, "steps=5", "ckpt_every=0", "metrics.enabled=true",
                     "metrics.tracking_uri=http://127.0.0.1:9", "metrics.close_timeout_s=2")
    assert done.returncode == 0, done.stdout[-3000:]
    assert sorted(losses(tmp_path / "r")) == [1, 2, 3, 4, 5]
    assert "unreachable" in done.stdout + done.stderr
