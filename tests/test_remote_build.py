"""Datasets built to a URL (evav.data.publish), against a real S3 server (moto's, on loopback):
`evav preprocess ... --out s3://...` uploads exactly the local build's files (byte for byte, the
manifest last and no build state); a build killed mid-upload shows no manifest and its rerun sends
only what is missing; a missing bucket or a store that is down is one line, exit 2, before any
build work; `evav inspect` reads the URL as it reads a folder; and end to end, a 2-rank training
run on the URL, resumed from its checkpoint, then `evav eval --data URL`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evav.manifest import load_manifest
from evav.metrics import read_metrics
from tests.conftest import REPO
from tests.s3_fixtures import moto_s3, s3
from tools.mlflow_server import free_port

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

BUCKET = "evav-build"
SYN = [
    "synthetic",
    "--shard-samples",
    "4",
    "train_per_task=2",
    "val_per_task=1",
    "render.height=32",
    "render.width=32",
]
PUBLISHED = re.compile(r"^published (\d+) files? \(([\d.]+) MiB\) to (\S+)(?: \((\d+) already)?")


def evav(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "evav.cli", *map(str, args)],
        cwd=REPO,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def published(done) -> tuple[int, int]:
    """(files uploaded, files skipped) from the final line of a publish."""
    lines = [m for line in done.stdout.splitlines() if (m := PUBLISHED.match(line))]
    assert len(lines) == 1, done.stdout
    return int(lines[0][1]), int(lines[0][4] or 0)


def objects(prefix: str) -> dict[str, bytes]:
    fs = s3()
    return {p[len(prefix) + 1 :]: fs.cat_file(p) for p in fs.find(prefix)}


def dataset_files(d: Path) -> dict[str, bytes]:
    """A local build's dataset files: everything but its private state and temporary files."""
    return {
        p.relative_to(d).as_posix(): p.read_bytes()
        for p in d.rglob("*")
        if p.is_file() and not any(x.startswith(".") for x in p.relative_to(d).parts)
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The server, a bucket, EVAV_CACHE (the default stage) in a temporary folder."""
    with pytest.MonkeyPatch.context() as mp, moto_s3(mp) as endpoint:
        mp.setenv("EVAV_CACHE", str(tmp_path_factory.mktemp("cache")))
        s3().mkdir(BUCKET)
        yield endpoint


@pytest.fixture(scope="module")
def built(store, tmp_path_factory):
    """The same build twice: to a local folder, and to s3://BUCKET/ds (default stage)."""
    local = tmp_path_factory.mktemp("local") / "ds"
    ok(evav("preprocess", *SYN, "--out", local))
    url = f"s3://{BUCKET}/ds"
    done = ok(evav("preprocess", *SYN, "--out", url))
    return local, url, done


def test_build_to_s3_uploads_exactly_the_local_build(built):
    local, url, done = built
    want, got = dataset_files(local), objects(url[5:])
    assert sorted(got) == sorted(want) and "manifest.json" in got
    assert not any(k.startswith(".build") or "/." in k for k in got)  # no build state, no temps
    n, skipped = published(done)
    assert (n, skipped) == (len(want), 0)
    assert done.stdout.splitlines()[-1].startswith(f"{url}: train: 10 samples")
    for rel in want:  # byte-deterministic: shards, indexes, descriptors identical
        if rel != "manifest.json":
            assert got[rel] == want[rel], rel
    # the manifest differs only in the command it records (its --out)
    a, b = json.loads(want["manifest.json"]), json.loads(got["manifest.json"])
    assert b.pop("commands") == [a.pop("commands")[0].replace(str(local), url)]
    assert a == b
    m = load_manifest(url)
    assert m.splits["train"].samples == 10 and len(m.splits["val"].shards) == 2


def test_killed_upload_leaves_no_manifest_and_the_rerun_sends_only_what_is_missing(store, tmp_path):
    url = f"s3://{BUCKET}/killed"
    stage = tmp_path / "stage"
    killed = evav(
        "preprocess", *SYN, "--out", url, "--stage", stage, env={"EVAV_FAULT": "kill_in_publish:3"}
    )
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    there = objects(url[5:])
    assert len(there) == 3 and "manifest.json" not in there  # shards first, manifest last
    with pytest.raises(ValueError, match="no manifest"):
        load_manifest(url)  # what a reader sees: no dataset, never a half one
    total = len(dataset_files(stage))
    again = ok(evav("preprocess", *SYN, "--out", url, "--stage", stage))
    assert published(again) == (total - 3, 3)
    assert "shards already done" in again.stdout  # the build itself resumed too
    assert sorted(objects(url[5:])) == sorted(dataset_files(stage))
    # killed between the shards and the manifest: only the manifest is sent
    s3().rm(f"{url[5:]}/manifest.json")
    assert published(ok(evav("preprocess", *SYN, "--out", url, "--stage", stage))) == (1, total - 1)
    # a complete dataset: nothing is sent; --merge in the stage publishes the same way
    assert published(ok(evav("preprocess", "--merge", "--out", url, "--stage", stage))) == (
        0,
        total,
    )


def test_a_different_dataset_at_the_url_loses_its_manifest_before_its_shards_are_replaced(
    built, tmp_path
):
    local, _, _ = built
    url = f"s3://{BUCKET}/replaced"
    fs = s3()
    fs.put(str(local), url[5:], recursive=True)
    fs.pipe(f"{url[5:]}/manifest.json", b'{"another": "dataset"}')
    done = ok(evav("preprocess", *SYN, "--out", url, "--stage", tmp_path / "stage"))
    assert "replaced by the new build" in done.stdout
    n, skipped = published(done)
    assert n == 1 and skipped == len(dataset_files(local)) - 1  # the same shards stayed
    assert load_manifest(url).splits["train"].samples == 10


@pytest.mark.parametrize("case", ["no-bucket", "store-down", "https", "pipe"])
def test_unwritable_out_is_one_line_exit_2_before_any_build_work(store, tmp_path, case):
    out, env = f"s3://{BUCKET}/ds-{case}", {}
    if case == "no-bucket":
        out = "s3://no-such-bucket-here/ds"
        want = f"{out}: bucket 'no-such-bucket-here' does not exist"
    elif case == "store-down":
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
        want = f"{out}: cannot reach after 3 tries (EndpointConnectionError"
    elif case == "https":
        out = "https://example.invalid/ds"
        want = f"--out {out}: only s3:// URLs can be written"
    else:
        out = f"pipe:aws s3 cp - s3://{BUCKET}/x"
        want = f"--out {out}: a shell command is not an output"
    stage = tmp_path / "stage"
    t0 = time.monotonic()
    done = evav("preprocess", *SYN, "--out", out, "--stage", stage, env=env)
    assert time.monotonic() - t0 < 20
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"evav preprocess: error: {want}"), lines
    assert not stage.exists()  # nothing was built


def test_inspect_reads_the_url_as_it_reads_the_folder(built, tmp_path):
    local, url, _ = built
    here = ok(evav("inspect", local, "--out", tmp_path / "here.png"))
    there = ok(evav("inspect", url, "--out", tmp_path / "there.png"))
    assert there.stdout.replace(str(tmp_path / "there.png"), "X") == here.stdout.replace(
        str(tmp_path / "here.png"), "X"
    )
    assert (tmp_path / "there.png").read_bytes() == (tmp_path / "here.png").read_bytes()
    v = ok(evav("inspect", url, "--verify"))
    assert "verified 5 shard(s), 15 sample(s)" in v.stdout and "no problems found" in v.stdout
    one = ok(evav("inspect", f"{url}/train/shard-000001.tar"))
    assert one.stdout.startswith("1 shard(s)")
    # a shard changed in the store: --verify names it; a missing dataset is one line, exit 2
    fs = s3()
    key = f"{url[5:]}/train/shard-000001.tar"
    saved = fs.cat_file(key)
    fs.pipe(key, saved[:-1] + b"\1")
    try:
        bad = evav("inspect", url, "--verify")
    finally:
        fs.pipe(key, saved)
    assert bad.returncode == 1 and "train/shard-000001.tar: sha256:" in bad.stdout
    gone = evav("inspect", f"s3://{BUCKET}/absent")
    assert gone.returncode == 2 and "Traceback" not in gone.stderr
    assert gone.stderr.startswith(f"evav inspect: error: s3://{BUCKET}/absent/manifest.json")


def test_train_on_the_url_killed_resumed_then_eval_from_the_url(built, tmp_path):
    """2 ranks, 2 DataLoader workers each, reading only from the store; killed (SIGKILL) while
    saving step 4, resumed from step 2's checkpoint to step 4 with the same samples (the loss
    records of steps 3-4 equal the killed run's); then `evav eval --data URL` scores it exactly as
    from the local folder."""
    from evav import checkpoint
    from tests.test_train_lockstep import torchrun

    local, url, _ = built
    run = tmp_path / "run"
    common = ["data.num_workers=2", "val_every=0", "ckpt_every=2", "log_every=1"]
    first = torchrun(run, [url], "steps=4", *common, env={"EVAV_FAULT": "kill_in_save:4"})
    assert first.returncode != 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert [s for s, _ in checkpoint.complete_checkpoints(run)] == [2]
    killed = {r["step"]: r["train/loss"] for r in read_metrics(run) if "train/loss" in r}
    assert sorted(killed) == [1, 2, 3, 4]
    again = torchrun(run, [url], "steps=4", *common)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert re.search(r"resumed from \S+ at step 2", again.stdout + again.stderr)
    train = [r for r in read_metrics(run) if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 3, 4]
    assert train[-1]["data/skipped"] == 0
    for r in train[-2:]:  # the resumed steps saw the samples the killed ones saw
        assert r["train/loss"] == pytest.approx(killed[r["step"]], rel=1e-5)
    assert [s for s, _ in checkpoint.complete_checkpoints(run)] == [2, 4]
    args = ["--limit", "1", "--no-mlflow", "--no-report", "--quiet"]
    ok(evav("eval", run, "--data", url, "--out", tmp_path / "url.json", *args))
    ok(evav("eval", run, "--data", local, "--out", tmp_path / "local.json", *args))
    a = json.loads((tmp_path / "url.json").read_text())
    b = json.loads((tmp_path / "local.json").read_text())
    assert a["step"] == 4 and a["split"] == "val" and a["skipped_total"] == 0
    assert set(a["tasks"]) == {"add", "count", "direction", "next", "pitch"}
    assert a["tasks"] == b["tasks"]
