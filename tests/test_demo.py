"""The one-command demo (tools/demo.py, `make demo`) at its tiny size: the same pipeline as the
full demo (synthetic shards -> DeepSpeed training on the CPU -> evav eval -> summary), checked
through what a user sees: the printed table and paths, the files, the MLflow store."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import REPO
from tools.demo import CONFIG, SIZES, Demo, pick_run_dir, predictions_sheet, summary_rows

TASKS = {
    "count": "classification",
    "pitch": "classification",
    "add": "classification",
    "direction": "classification",
    "next": "video_prediction",
}


def run_demo(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(
        [sys.executable, "tools/demo.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done


@pytest.mark.slow
def test_tiny_demo_prints_the_table_and_writes_its_files(tmp_path):
    out = tmp_path / "demo"
    done = run_demo("--out", str(out), "--size", "tiny")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    text = done.stdout
    for stage in ("1/4 shards", "2/4 train", "3/4 eval", "4/4 summary"):  # progress per stage
        assert f"== {stage}" in text
    assert "step 6/6" in text  # the trainer's own progress lines come through

    # the table: one row per task with the model's number, chance and a trivial baseline
    rows = {
        m.group(1): m
        for m in re.finditer(
            r"^\| (\w+) \| (\w+) \| (\d+) \| ([^|]+) \| ([\d.]+) \| ([\d.]*) \| ([^|]+) \|$",
            text,
            re.M,
        )
    }
    assert {t: rows[t].group(2) for t in TASKS if t in rows} == TASKS, text[-3000:]
    for task, kind in TASKS.items():
        if kind == "classification":
            assert 0 < float(rows[task].group(6)) <= 0.5  # chance: 1 / number of answers
        assert "copy the last input frame" in rows["next"].group(7)

    run_dir = out / "runs" / "tiny"
    summary = json.loads((run_dir / "demo_summary.json").read_text())
    assert summary["run_dir"] == str(run_dir) and summary["resumed"] is False
    assert f"run dir:      {run_dir} (new)" in text
    assert (run_dir / "checkpoints" / "step_00000006" / "COMPLETE").is_file()
    results = json.loads((run_dir / "eval" / "demo.json").read_text())
    assert results["step"] == 6 and set(results["tasks"]) == set(TASKS)
    assert all(r["samples"] == SIZES["tiny"].eval_limit for r in results["tasks"].values())

    # the contact sheet of predictions: one labelled block per task
    sheet = Path_from(text, "predictions:")
    assert sheet == run_dir / "predictions.png"
    img = Image.open(sheet)
    assert img.width > 200 and img.height > 5 * 100

    # the MLflow command opens the store the run and its evaluation were logged to
    cmd = next(line for line in text.splitlines() if line.startswith("MLflow UI:"))
    uri = cmd.split("--backend-store-uri ", 1)[1].strip()
    assert uri == f"sqlite:///{out / 'runs' / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FINISHED"
    assert "train/loss" in run.data.metrics
    eval_run = re.search(r"mlflow:\s+run (\w+) at (\S+)", text)  # printed by evav eval
    assert eval_run and eval_run.group(2) == uri, text[-3000:]
    metrics = client.get_run(eval_run.group(1)).data.metrics
    where = f"eval/{results['dataset']}/val"  # eval/DATASET/SPLIT/TASK/METRIC
    assert results["dataset"] and results["split"] == "val", results
    assert {f"{where}/{t}/samples" for t in TASKS} <= set(metrics), sorted(metrics)

    # again: the shards are reused and the finished run is resumed (evaluated, not retrained)
    lines = (run_dir / "metrics.jsonl").read_text().count("\n")
    again = run_demo("--out", str(out), "--size", "tiny")
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert f"resuming {run_dir}" in again.stdout and "(resumed)" in again.stdout
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == lines

    # --fresh: a new run directory beside the first
    assert pick_run_dir(out / "runs", "tiny", fresh=True) == (out / "runs" / "tiny-2", False)


def Path_from(text: str, label: str):  # noqa: N802 - reads like the Path it returns
    from pathlib import Path

    line = next(x for x in text.splitlines() if x.startswith(label))
    return Path(line.split(label, 1)[1].strip())


def test_make_demo_sets_up_then_runs_the_demo():
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", "demo"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["./setup.sh", ".venv/bin/python tools/demo.py "]
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", "demo", "DEMO_ARGS=--size tiny"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert ".venv/bin/python tools/demo.py --size tiny" in done.stdout


def test_run_dir_is_resumed_or_fresh(tmp_path):
    runs = tmp_path / "runs"
    assert pick_run_dir(runs, "full", fresh=False) == (runs / "full", False)
    (runs / "full").mkdir(parents=True)
    assert pick_run_dir(runs, "full", fresh=False) == (runs / "full", True)
    assert pick_run_dir(runs, "full", fresh=True) == (runs / "full-2", False)
    (runs / "full-2").mkdir()
    assert pick_run_dir(runs, "full", fresh=False) == (runs / "full-2", True)
    assert pick_run_dir(runs, "full", fresh=True) == (runs / "full-3", False)


def test_a_run_trained_on_other_shards_is_not_resumed(tmp_path):
    from evav.config import load_config
    from evav.train import TrainConfig

    size = SIZES["tiny"]
    cfg = load_config(TrainConfig, CONFIG, size.overrides)
    demo = Demo(tmp_path, "tiny", size, CONFIG, cfg, fresh=False)
    assert demo.run_dir == tmp_path / "runs" / "tiny" and not demo.resumed
    demo.run_dir.mkdir(parents=True)
    (demo.run_dir / "config.yaml").write_text(f"data:\n  train: [{demo.shards}]\n")
    assert Demo(tmp_path, "tiny", size, CONFIG, cfg, fresh=False).resumed  # same shards
    (demo.run_dir / "config.yaml").write_text("data:\n  train: [/elsewhere/synthetic]\n")
    again = Demo(tmp_path, "tiny", size, CONFIG, cfg, fresh=False)
    assert (again.run_dir, again.resumed) == (tmp_path / "runs" / "tiny-2", False)
    other = SIZES["tiny"].__class__(**{**vars(size), "train_per_task": 9})
    assert Demo(tmp_path, "tiny", other, CONFIG, cfg, fresh=False).shards != demo.shards


def test_summary_rows_compare_with_chance_and_the_best_constant_answer():
    results = {
        "tasks": {
            "add": {"kind": "classification", "samples": 4, "accuracy": 0.75, "chance": 1 / 3},
            "next": {"kind": "video_prediction", "samples": 2, "psnr": 30.0},
        },
        "predictions": [
            {"task": "add", "true": t, "pred": "x"} for t in ("one", "one", "one", "two")
        ],
    }
    rows = {r["task"]: r for r in summary_rows(results, {"next": 20.0})}
    assert rows["add"]["baseline"] == 0.75 and rows["add"]["above"] == 0.0
    assert rows["next"]["baseline"] == 20.0 and rows["next"]["above"] == 10.0


def test_bad_config_and_missing_examples_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {preset: nope}\n")
    done = run_demo("--out", str(tmp_path / "o"), "--config", str(bad), "--size", "tiny")
    assert done.returncode == 2
    assert str(bad) in done.stderr and "unknown model preset 'nope'" in done.stderr
    assert not (tmp_path / "o").exists()  # nothing was built
    with pytest.raises(FileNotFoundError, match="no example images"):
        predictions_sheet(tmp_path / "empty", tmp_path / "sheet.png")
