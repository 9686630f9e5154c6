"""`evav eval`, `evav generate` and `evav export` on a real (briefly trained) checkpoint.

One debug model is trained for a few steps with DeepSpeed (ZeRO 2) on synthetic shards; the
tests then evaluate it the ways a user would: a run dir, a step dir, an export; twice; with 1 and
2 processes; with damaged data; with data rendered differently from its training data.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

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
    # no --data: the run's training data (data.train), on its validation split
    done = evav("eval", run, "--limit", PER_TASK, "--quiet")
    out = run / "eval" / "synthetic" / "val" / "step_00000004.json"  # DATASET/SPLIT/step
    r = results(out)
    assert r["step"] == 4 and r["split"] == "val" and r["render_hash"]
    assert r["dataset"] == "synthetic" and r["datasets"] == [str(shards)]
    assert (r["limit"], r["seed"]) == (PER_TASK, 0)
    assert set(r["tasks"]) == {"add", "count", "direction", "next", "pitch"}
    for task, m in r["tasks"].items():
        assert m["samples"] == PER_TASK and m["skipped"] == {} and m["skipped_total"] == 0
        records = [p for p in r["predictions"] if p["task"] == task]
        truths = [p["true"] for p in records if "true" in p]
        if task == "next":
            assert m["kind"] == "video_prediction" and len(m["psnr_per_frame"]) == 2
            assert 0 < m["copy_last_psnr"] <= 100 and 0 < m["copy_last_ssim"] <= 1
            assert "majority" not in m and "answers" not in m
        else:
            assert m["kind"] == "classification" and len(records) == len(truths) == PER_TASK
            # the accuracy and the confusion matrix, recounted from the prediction records
            right = sum(p["pred"] == p["true"] for p in records)
            assert m["accuracy"] == right / PER_TASK
            at = {c: i for i, c in enumerate(m["labels"])}
            assert all(p["pred"] in at and p["true"] in at for p in records)  # nearest label
            confusion = [[0] * len(at) for _ in at]
            for p in records:
                confusion[at[p["true"]]][at[p["pred"]]] += 1
            assert m["confusion"] == confusion and sum(map(sum, confusion)) == PER_TASK
            assert sum(confusion[i][i] for i in range(len(at))) == right
            # the answer distribution and the majority baseline of the evaluated samples
            ordered = sorted(Counter(truths).items(), key=lambda kv: (-kv[1], kv[0]))
            assert m["answers"] == [list(x) for x in ordered]
            assert m["majority_answer"] == ordered[0][0]
            assert m["majority"] == ordered[0][1] / PER_TASK
            assert m["chance"] == 1 / len(m["labels"])
    assert len(r["predictions"]) == 5 * PER_TASK
    assert "synthetic, split val, step 4, 6 per task (seed 0)" in done.stdout
    count = r["tasks"]["count"]
    row = f"| count | classification | 6 | 0 | accuracy | {count['accuracy']:.3f} | "
    row += f"{count['chance']:.3f} | {count['majority']:.3f} majority | "
    assert row in done.stdout, done.stdout
    nxt = r["tasks"]["next"]
    assert f"| {nxt['copy_last_psnr']:.3f} copy-last |  |" in done.stdout
    assert (
        r["skipped_total"] == 0 and r["skipped_samples"] == [] and "bad sample" not in done.stdout
    )
    report = out.with_name("step_00000004_report")
    assert (report / "report.md").is_file() and len(list((report / "examples").glob("*.png"))) == 10
    # labelled, upscaled sheets: 64 px frames shown at 192 px, three rows and their labels
    sheet = Image.open(report / "examples" / "count_0.png")
    assert sheet.height > 3 * 192 and sheet.width >= 3 * 192  # count: 3 prompt frames
    # logged into the training run, at the checkpoint's step, under dataset and split
    from mlflow.tracking import MlflowClient

    run_id = (run / "mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    hist = client.get_metric_history(run_id, "eval/synthetic/val/count/accuracy")
    assert [(h.step, h.value) for h in hist] == [(4, r["tasks"]["count"]["accuracy"])]
    hist = client.get_metric_history(run_id, "eval/synthetic/val/count/majority")
    assert [h.value for h in hist] == [count["majority"]]
    tags = client.get_run(run_id).data.tags
    assert (tags["eval.step"], tags["eval.dataset"], tags["eval.split"]) == (
        "4",
        "synthetic",
        "val",
    )
    listed = client.list_artifacts(run_id, "eval/synthetic/val/step_00000004")
    assert {Path(a.path).name for a in listed} == {"step_00000004.json", "step_00000004_report"}


def test_outputs_per_dataset_and_split_and_the_report_is_replaced_whole(trained, tmp_path):
    root, shards, run = trained
    common = ["--data", shards, "--no-mlflow", "--quiet"]
    val = run / "eval" / "synthetic" / "val" / "step_00000004.json"
    evav("eval", run, "--limit", 2, *common)
    stale = val.with_name("step_00000004_report") / "examples" / "gone_0.png"
    stale.write_bytes(b"an example of an earlier evaluation")
    # another split goes elsewhere; the same split again replaces the report folder whole
    evav("eval", run, "--split", "train", "--limit", 1, *common)
    train = run / "eval" / "synthetic" / "train" / "step_00000004.json"
    assert results(train)["split"] == "train" and results(val)["split"] == "val"
    assert all(m["samples"] == 1 for m in results(train)["tasks"].values())
    evav("eval", run, "--limit", 1, *common)
    assert all(m["samples"] == 1 for m in results(val)["tasks"].values())
    assert not stale.exists() and len(list(stale.parent.glob("*.png"))) == 5
    assert not list(val.parent.glob(".*"))  # no temporary folder left behind
    # a --report folder that is not a report is never replaced
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    bad = evav("eval", run, "--limit", 1, "--report", precious, *common, check=False)
    assert bad.returncode == 2 and "not an evaluation report folder" in bad.stderr
    assert (precious / "notes.txt").read_text() == "keep me"
    # seeds: the same seed, the same samples; --limit of the whole split: every sample
    a, b, c = (tmp_path / f"{x}.json" for x in "abc")
    evav("eval", run, "--limit", 3, "--seed", 5, "--out", a, "--no-report", *common)
    evav("eval", run, "--limit", 3, "--seed", 5, "--out", b, "--no-report", *common)
    evav("eval", run, "--limit", 3, "--seed", 6, "--out", c, "--no-report", *common)
    keys = lambda p: [x["key"] for x in results(p)["predictions"]]  # noqa: E731
    assert keys(a) == keys(b) and keys(a) != keys(c) and len(keys(a)) == 15


def test_eval_without_data_needs_the_split_in_the_training_data(trained):
    root, shards, run = trained
    done = evav("eval", run, "--split", "test", "--no-mlflow", check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("evav eval: error:")]
    assert "no --data given" in line and f"{shards} has no split 'test'" in line
    assert line.endswith("pass --data DIR")


def test_generate_reads_its_answer_back(trained, tmp_path):
    root, shards, run = trained
    out = tmp_path / "g.png"
    gen = evav("generate", run, "--task", "add", "--input", "two plus two", "--out", out)
    (line,) = [x for x in gen.stdout.splitlines() if x.startswith("read back: ")]
    assert "mean squared distance" in line and "runner-up" in line, gen.stdout
    answer = line.split("'")[1]
    assert answer in {p.strip() for p in answers_of(shards, "add")}
    # a next-frame task has no answer to read back: said so
    nxt = evav("generate", run, "--task", "next", "--input", "two", "--out", out)
    assert "read back: none (task 'next' is of kind video_prediction" in nxt.stdout
    # an input that looks like a path but is not a file: one error line, exit 2
    for missing in ("nope/x.wav", "photo.png", str(tmp_path / "clip.mp4")):
        done = evav("generate", run, "--task", "add", "--input", missing, "--out", out, check=False)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        (line,) = [x for x in done.stderr.splitlines() if x.startswith("evav generate: error:")]
        assert missing in line and "no such file" in line


def answers_of(shards: Path, task: str) -> set[str]:
    from evav.eval.samples import load_eval_data

    data = load_eval_data([str(shards)], "val")
    return {str(s.meta["answer"]) for s in data.by_task()[task]}


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
