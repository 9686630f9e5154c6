"""`evav eval`, `evav generate` and tools/export.py on a real (briefly trained) checkpoint.

One debug model is trained for a few steps with DeepSpeed (ZeRO 2) on synthetic shards; the
tests then evaluate it the ways a user would: a run dir, a step dir, an export; twice; with 1 and
2 processes; with damaged data; with data rendered differently from its training data.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools.mlflow_server import free_port

REPO = Path(__file__).resolve().parents[1]
PER_TASK = 6  # evaluated samples per task


def evav(*args, check=True, **kw):
    done = subprocess.run(
        [sys.executable, "-m", "evav.cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        **kw,
    )
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    shards = root / "synthetic"
    evav("preprocess", "synthetic", "--out", shards, "train_per_task=24", "val_per_task=8")
    run = root / "run"
    evav(
        "train",
        "configs/debug.yaml",
        f"data.train=[{shards}]",
        f"run_dir={run}",
        "steps=4",
        "micro_batch=4",
        "log_every=2",
        "val_every=0",
        "ckpt_every=4",
        "engine.zero_stage=2",
    )
    return root, shards, run


def results(path: Path) -> dict:
    return json.loads(path.read_text())


def test_eval_run_dir_writes_results_report_and_mlflow(trained):
    root, shards, run = trained
    done = evav("eval", run, "--data", shards, "--limit", PER_TASK, "--quiet")
    out = run / "eval" / "step_00000004.json"  # the default for a training checkpoint
    r = results(out)
    assert r["step"] == 4 and r["split"] == "val" and r["render_hash"]
    assert set(r["tasks"]) == {"add", "count", "direction", "next", "pitch"}
    for task, m in r["tasks"].items():
        assert m["samples"] == PER_TASK and m["skipped"] == {} and m["skipped_total"] == 0
        if task == "next":
            assert m["kind"] == "video_prediction" and len(m["psnr_per_frame"]) == 2
        else:
            assert m["kind"] == "classification" and 0 <= m["accuracy"] <= 1
            assert sum(map(sum, m["confusion"])) == PER_TASK
    assert len(r["predictions"]) == 5 * PER_TASK
    assert "| count | classification | 6 | 0 | accuracy |" in done.stdout
    assert (
        r["skipped_total"] == 0 and r["skipped_samples"] == [] and "bad sample" not in done.stdout
    )
    report = out.with_name("step_00000004_report")
    assert (report / "report.md").is_file() and len(list((report / "examples").glob("*.png"))) == 10
    # logged into the training run, at the checkpoint's step
    from mlflow.tracking import MlflowClient

    run_id = (run / "mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    hist = client.get_metric_history(run_id, "eval/count/accuracy")
    assert [(h.step, h.value) for h in hist] == [(4, r["tasks"]["count"]["accuracy"])]
    assert client.get_run(run_id).data.tags["eval.step"] == "4"


def test_eval_is_deterministic_and_the_same_with_two_processes(trained, tmp_path):
    root, shards, run = trained
    step = run / "checkpoints" / "step_00000004"
    common = [
        "--data",
        shards,
        "--limit",
        PER_TASK,
        "--no-mlflow",
        "--no-report",
        "--quiet",
        "--batch-size",
        "4",
    ]
    evav("eval", step, "--out", tmp_path / "a.json", *common)
    evav("eval", step, "--out", tmp_path / "b.json", *common)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "-m",
            "evav.cli",
            "eval",
            str(step),
            "--out",
            str(tmp_path / "c.json"),
            *map(str, common),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a, b, c = (results(tmp_path / f"{x}.json") for x in "abc")
    assert a["tasks"] == b["tasks"] and a["predictions"] == b["predictions"]
    assert c["processes"] == 2
    assert c["tasks"] == a["tasks"] and c["predictions"] == a["predictions"]


def test_export_gives_the_same_results_without_deepspeed(trained, tmp_path):
    root, shards, run = trained
    exp = tmp_path / "export"
    done = subprocess.run(
        [sys.executable, "tools/export.py", str(run), "--out", str(exp)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p.name for p in exp.iterdir()} == {
        "model.safetensors",
        "config.yaml",
        "export.json",
        "render_spec.yaml",
    }
    assert json.loads((exp / "export.json").read_text())["step"] == 4
    common = ["--data", shards, "--limit", PER_TASK, "--no-mlflow", "--no-report", "--quiet"]
    evav("eval", exp, "--out", tmp_path / "e.json", *common)
    evav("eval", run, "--out", tmp_path / "t.json", *common)
    e, t = results(tmp_path / "e.json"), results(tmp_path / "t.json")
    assert e["tasks"] == t["tasks"] and e["predictions"] == t["predictions"]
    # exporting over an existing directory needs --force
    again = subprocess.run(
        [sys.executable, "tools/export.py", str(run), "--out", str(exp)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "--force" in again.stderr
    # generate from the export: 5 prompt frames ("add" task, 3 words, separator) + 1 answer
    gen = evav(
        "generate", exp, "--task", "add", "--input", "two plus two", "--out", tmp_path / "g.png"
    )
    assert "5 prompt frames + 1 generated" in gen.stdout and (tmp_path / "g.png").is_file()


def test_render_mismatch_is_an_error_unless_allowed(trained, tmp_path):
    root, shards, run = trained
    other = tmp_path / "other"
    evav(
        "preprocess",
        "synthetic",
        "--out",
        other,
        "train_per_task=2",
        "val_per_task=2",
        "render.font_scale=1.5",
    )
    bad = evav("eval", run, "--data", other, "--no-mlflow", "--quiet", check=False)
    assert (
        bad.returncode == 2 and "render" in bad.stderr and "--allow-render-mismatch" in bad.stderr
    )
    ok = evav(
        "eval",
        run,
        "--data",
        other,
        "--out",
        tmp_path / "x.json",
        "--no-mlflow",
        "--no-report",
        "--quiet",
        "--allow-render-mismatch",
    )
    assert results(tmp_path / "x.json")["tasks"]["add"]["samples"] == 2, ok.stderr


def test_corrupt_clip_is_skipped_and_counted(trained, tmp_path):
    root, shards, run = trained
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    shard = copy / "val" / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    start = data.index(b"ftyp") + 2000  # inside the first sample's mp4 member
    data[start : start + 400] = bytes(400)
    shard.write_bytes(bytes(data))
    evav(
        "eval",
        run,
        "--data",
        copy,
        "--out",
        tmp_path / "r.json",
        "--limit",
        PER_TASK,
        "--no-mlflow",
        "--no-report",
        "--quiet",
    )
    r = results(tmp_path / "r.json")
    # the zeroed bytes no longer match the clip's checksum: caught before decoding
    assert [m["skipped"] for m in r["tasks"].values() if m["skipped"]] == [{"checksum": 1}]
    assert sum(m["samples"] for m in r["tasks"].values()) == 5 * PER_TASK - 1
    assert r["skipped"] == {"checksum": 1} and r["skipped_total"] == 1
    (bad,) = r["skipped_samples"]
    assert bad["where"] == f"{shard} key '00000000'" and bad["reason"] == "checksum"
    assert len(r["predictions"]) == 5 * PER_TASK - 1


def test_errors_name_the_problem(trained, tmp_path):
    root, shards, run = trained
    missing = evav("eval", tmp_path / "nope", "--data", shards, check=False)
    assert missing.returncode == 2 and "no such file" in missing.stderr
    not_ckpt = evav("eval", shards, "--data", shards, check=False)
    assert not_ckpt.returncode == 2 and "not a run directory" in not_ckpt.stderr
    no_split = evav("eval", run, "--data", shards, "--split", "test", check=False)
    assert no_split.returncode == 2 and "no split 'test'" in no_split.stderr
