"""slurm/preprocess.sbatch on the real local Slurm cluster, submitted by `evav submit --preprocess`:
an array of 2 parts plus the dependent merge builds the same shards and manifest as one process.

Needs the ``slurm_cluster`` fixture (tests/slurm_fixtures.py: skips without Slurm/munge or root).
"""

from __future__ import annotations

import json
from pathlib import Path

from evav.cli import main
from tests.slurm_fixtures import parse_scontrol_record
from tests.test_slurm_train import evav_submit

# 30 train + 10 val inputs, 7 per shard: 5 + 2 shards, dealt round-robin to the 2 parts
OPTIONS = ["train_per_task=6", "val_per_task=2"]
FLAGS = ["--shard-samples", "7"]


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/shard-*.tar"))}


def manifest(out: Path) -> dict:
    drop = ("commands", "code_version")  # the command lines name --out; parts record theirs
    return {
        k: v for k, v in json.loads((out / "manifest.json").read_text()).items() if k not in drop
    }


def test_array_of_two_parts_and_merge_equal_a_single_process_build(slurm_cluster, tmp_path):
    single = tmp_path / "single"
    assert main(["preprocess", "synthetic", "--out", str(single), *FLAGS, *OPTIONS]) == 0

    out = tmp_path / "array"
    res, jobs = evav_submit(
        slurm_cluster,
        tmp_path,
        "--preprocess",
        "synthetic",
        "--out",
        out,
        "--parts",
        "2",
        "--cpus-per-task",
        "1",
        "--time",
        "5",
        *FLAGS,
        *OPTIONS,
        "--sbatch=--mem-per-cpu=256M",
    )
    assert len(jobs) == 2, res.stdout
    array, merge = jobs
    logs = out / ".slurm"
    state = slurm_cluster.wait(merge, timeout=180)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(logs.glob("*.out")))
    assert state == "COMPLETED", (
        tails + slurm_cluster.describe(array) + slurm_cluster.describe(merge)
    )

    records = [
        parse_scontrol_record(line)
        for line in slurm_cluster.cluster.jobcomp_log.read_text().splitlines()
    ]
    tasks = [r for r in records if r.get("ArrayJobId") == str(array)]
    assert sorted(r["ArrayTaskId"] for r in tasks) == ["0", "1"], tasks
    assert all(r["JobState"] == "COMPLETED" for r in tasks), tasks
    (merged,) = [r for r in records if r.get("JobId") == str(merge)]
    assert merged["StartTime"] >= max(r["EndTime"] for r in tasks), (merged, tasks)
    assert "(part 0 of 2)" in (logs / f"part-{array}_0.out").read_text(), tails
    assert "(part 1 of 2)" in (logs / f"part-{array}_1.out").read_text(), tails
    assert "train: 30 samples" in (logs / f"merge-{merge}.out").read_text(), tails

    assert manifest(out) == manifest(single)
    assert shard_bytes(out) == shard_bytes(single)
    (command,) = json.loads((out / "manifest.json").read_text())["commands"]  # both parts'
    assert command.startswith(f"evav preprocess synthetic --out {out} --workers 1 "), command
