"""Checkpoints that verify themselves (issue 15): real DeepSpeed engines through `evav train`.

The newest checkpoint damaged three ways (truncated shard, engine/ deleted, a flipped byte in a
weight), in 1 and 2 processes: the reason is logged, it is set aside (never deleted) and the run
resumes from the previous one; retention counts only verified checkpoints; non-finite weights
are never committed; steps past 99,999,999; legacy markers; and planted pickle payloads in the
train state, the model states and an optimizer shard, refused by resume, evaluation and export
with the file named, the payload never run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from evav import checkpoint
from tests.test_train import REPO, run_train

MODEL_STATES = "engine/mp_rank_00_model_states.pt"
OPTIM_SHARD = "engine/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"  # ZeRO >= 1, rank 0


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """The built-in synthetic suite, built once for this module."""
    out = tmp_path_factory.mktemp("shards") / "synthetic"
    cmd = [sys.executable, "-m", "evav.cli", "preprocess", "synthetic", "--out", str(out)]
    subprocess.run(
        [*cmd, "train_per_task=40", "val_per_task=8"], check=True, cwd=REPO, capture_output=True
    )
    return out


@pytest.fixture(scope="module")
def base(shards, tmp_path_factory):
    """A 1-process ZeRO-0 run with verified checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("base") / "run"
    done = run_train(run, shards, "steps=4", "ckpt_every=2", "keep_last=4")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert steps(run) == [2, 4]
    return run


@pytest.fixture(scope="module")
def base_zero1(shards, tmp_path_factory):
    """A 1-process ZeRO-1 run (model states + an optimizer shard) with a checkpoint at step 2."""
    run = tmp_path_factory.mktemp("base1") / "run"
    done = run_train(run, shards, "steps=2", "ckpt_every=2", "engine.zero_stage=1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (checkpoint.step_dir(run, 2) / OPTIM_SHARD).is_file()
    return run


def steps(run) -> list[int]:
    return [s for s, _ in checkpoint.complete_checkpoints(run)]


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def set_aside(run, step: int, slug: str) -> Path:
    found = sorted((Path(run) / "checkpoints").glob(f"step_{step:08d}.bad-{slug}-*"))
    assert len(found) == 1, sorted(p.name for p in (Path(run) / "checkpoints").iterdir())
    return found[0]


def rehash(ck: Path, rel: str, **marker_fields) -> None:
    """Make the marker match ``rel`` as it is now (a tamperer would), and set other fields."""
    marker = json.loads((ck / checkpoint.MARKER).read_text())
    f = ck / rel
    for e in marker["files"]:
        if e["path"] == rel:
            e.update(size=f.stat().st_size, sha256=hashlib.sha256(f.read_bytes()).hexdigest())
    marker.update(marker_fields)
    (ck / checkpoint.MARKER).write_text(json.dumps(marker))


def first_tensor_offset(path: Path) -> int:
    """Where the bytes of the first tensor pickled in a torch zip file begin (in DeepSpeed's
    model states: the first weight of ``module``)."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len


def truncate(ck: Path, rel: str = MODEL_STATES) -> str:
    f = ck / rel
    size = f.stat().st_size
    os.truncate(f, size // 2)
    return f"{rel}: size {size // 2}, marker says {size}"


def delete_engine(ck: Path) -> str:
    shutil.rmtree(ck / "engine")
    return f"{MODEL_STATES}: missing"


def flip_weight_byte(ck: Path) -> str:
    f = ck / MODEL_STATES
    at = first_tensor_offset(f) + 1001  # the high byte of a bf16 weight: its exponent
    with open(f, "r+b") as fh:
        fh.seek(at)
        b = fh.read(1)[0]
        fh.seek(at)
        fh.write(bytes([b ^ 0x40]))
    return f"{MODEL_STATES}: sha256 "


@pytest.mark.parametrize(
    "damage, slug",
    [(truncate, "size"), (delete_engine, "missing"), (flip_weight_byte, "sha256")],
    ids=["truncated", "engine-deleted", "bit-flip"],
)
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous_one(
    base,
    shards,
    tmp_path,
    damage,
    slug,
):
    run = copy_run(base, tmp_path / "run")
    newest = checkpoint.step_dir(run, 4)
    reason = damage(newest)
    kept = sorted(p.relative_to(newest).as_posix() for p in newest.rglob("*") if p.is_file())

    done = run_train(run, shards, "steps=6", "ckpt_every=2", "keep_last=1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"checkpoint {newest} fails verification: {reason}" in done.stdout
    assert f"resumed from {checkpoint.step_dir(run, 2)} at step 2" in done.stdout
    aside = set_aside(run, 4, slug)
    assert reason in (aside / "SET_ASIDE").read_text()
    files = sorted(p.relative_to(aside).as_posix() for p in aside.rglob("*") if p.is_file())
    assert files == sorted(kept + ["SET_ASIDE"])  # renamed with every file, nothing deleted
    # keep_last=1: the new step 4 replaced step 2, then step 6 replaced it; the set-aside one
    # is not a checkpoint any more, so it neither counted nor was deleted
    assert steps(run) == [6]
    assert checkpoint.verify(checkpoint.step_dir(run, 6)).ok


def test_two_processes_set_aside_a_checkpoint_whose_rank_1_shard_is_truncated(
    shards,
    tmp_path,
):
    run = tmp_path / "run"
    zero2 = ["engine.zero_stage=2", "keep_last=3"]
    first = run_train(run, shards, "steps=4", "ckpt_every=2", *zero2, nproc=2)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    newest = checkpoint.step_dir(run, 4)
    marker = json.loads((newest / checkpoint.MARKER).read_text())
    shard1 = "engine/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert {"train_state.pt", MODEL_STATES, shard1} <= {e["path"] for e in marker["files"]}
    assert marker["world_size"] == 2
    size = (newest / shard1).stat().st_size
    reason = truncate(newest, shard1)  # rank 1 hashes (and here checks) its own shard

    again = run_train(run, shards, "steps=6", "ckpt_every=2", *zero2, nproc=2)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"fails verification: {reason}" in again.stdout
    assert f"resumed from {checkpoint.step_dir(run, 2)} at step 2" in again.stdout
    assert (set_aside(run, 4, "size") / shard1).stat().st_size == size // 2
    assert steps(run) == [2, 4, 6]


def test_retention_sets_aside_an_older_checkpoint_that_fails_and_counts_only_verified_ones(
    base,
    shards,
    tmp_path,
):
    run = copy_run(base, tmp_path / "run")
    flip_weight_byte(checkpoint.step_dir(run, 2))
    done = run_train(run, shards, "steps=6", "ckpt_every=2", "keep_last=3")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resumed from {checkpoint.step_dir(run, 4)} at step 4" in done.stdout
    # keep_last=3 needs a third verified checkpoint: step 2 is hashed, fails, is set aside
    assert f"fails verification ({MODEL_STATES}: sha256" in done.stdout
    assert steps(run) == [4, 6]
    assert (set_aside(run, 2, "sha256") / MODEL_STATES).is_file()


def test_non_finite_weights_are_never_committed_and_the_error_names_the_last_good_one(
    shards,
    tmp_path,
):
    from evav.distributed import consolidated_state_dict

    # warmup steps 1-3 train normally; from step 4 on the cosine part of the schedule is
    # inf + (1 - inf) * c: a NaN learning rate, NaN weights after update 4
    run = tmp_path / "run"
    bad = run_train(
        run, shards, "steps=6", "ckpt_every=2", "optim.warmup_steps=3", "optim.min_lr_ratio=inf"
    )
    assert bad.returncode != 0
    good = checkpoint.step_dir(run, 2)
    assert "NonFiniteStateError: step 4: the weights or the optimizer state hold NaN or inf" in (
        bad.stderr
    )
    assert f"the last good checkpoint is {good}" in bad.stderr
    assert steps(run) == [2] and not checkpoint.step_dir(run, 4).exists()
    assert checkpoint.verify(good).ok
    weights = consolidated_state_dict(good, "engine")
    assert all(torch.isfinite(w).all() for w in weights.values())

    fresh = run_train(tmp_path / "inf", shards, "steps=3", "ckpt_every=1", "optim.lr=inf")
    assert fresh.returncode != 0
    assert "step 1: the weights or the optimizer state hold NaN or inf" in fresh.stderr
    assert "there is no good checkpoint" in fresh.stderr
    assert steps(tmp_path / "inf") == []


def test_a_checkpoint_past_step_99999999_is_resumed_from(base, shards, tmp_path):
    run = copy_run(base, tmp_path / "run")
    big = 100_000_004
    src, dst = checkpoint.step_dir(run, 4), checkpoint.step_dir(run, big)
    src.rename(dst)
    state = checkpoint.read_state(dst)
    torch.save({**state, "step": big}, dst / "train_state.pt")
    rehash(dst, "train_state.pt", step=big)
    assert checkpoint.verify(dst).ok and dst.name == "step_100000004"

    done = run_train(run, shards, f"steps={big + 1}", "ckpt_every=1", "keep_last=3")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resumed from {dst} at step {big}" in done.stdout
    assert steps(run) == [2, big, big + 1]
    assert checkpoint.last_good(run) == checkpoint.step_dir(run, big + 1)


def edit_marker(ck: Path, change) -> None:
    marker = json.loads((ck / checkpoint.MARKER).read_text())
    change(marker)
    (ck / checkpoint.MARKER).write_text(json.dumps(marker))


def _fifo_train_state(ck: Path) -> None:
    (ck / "train_state.pt").unlink()
    os.mkfifo(ck / "train_state.pt")


MARKER_DAMAGE = {
    "not-json": (
        lambda ck: (ck / checkpoint.MARKER).write_text('{"step": 4, "files": ['),
        "marker",
        "COMPLETE: not valid JSON",
    ),
    "not-an-object": (
        lambda ck: (ck / checkpoint.MARKER).write_text("[4]"),
        "marker",
        "COMPLETE: not a JSON object",
    ),
    "wrong-step": (
        lambda ck: edit_marker(ck, lambda m: m.update(step=3)),
        "marker",
        "COMPLETE: step 3, the directory says 4",
    ),
    "step-as-text": (
        lambda ck: edit_marker(ck, lambda m: m.update(step="4")),
        "marker",
        "COMPLETE: step '4', the directory says 4",
    ),
    "path-outside": (
        lambda ck: edit_marker(ck, lambda m: m["files"][0].update(path="../../etc/passwd")),
        "marker",
        "COMPLETE: files[0] '../../etc/passwd' is not inside it",
    ),
    "no-hash": (
        lambda ck: edit_marker(ck, lambda m: m["files"][1].pop("sha256")),
        "marker",
        "COMPLETE: files[1] is not {path, size, sha256}",
    ),
    "train-state-unlisted": (
        lambda ck: edit_marker(
            ck, lambda m: m.update(files=[e for e in m["files"] if e["path"] != "train_state.pt"])
        ),
        "marker",
        "COMPLETE: lists no train_state.pt or no engine/ file",
    ),
    "extra-engine-file": (
        lambda ck: (ck / "engine" / "zero_pp_rank_9_mp_rank_00_optim_states.pt").write_bytes(b"x"),
        "unlisted",
        "engine/zero_pp_rank_9_mp_rank_00_optim_states.pt: not listed in COMPLETE",
    ),
    "fifo": (_fifo_train_state, "unreadable", "train_state.pt: not a regular file"),
    "config-edited": (
        lambda ck: (ck / "config.yaml").write_text((ck / "config.yaml").read_text()[::-1]),
        "sha256",
        "config.yaml: sha256 ",
    ),
}


@pytest.mark.parametrize("name", list(MARKER_DAMAGE))
def test_verify_names_the_file_and_the_reason(base, tmp_path, name):
    damage, slug, reason = MARKER_DAMAGE[name]
    ck = checkpoint.step_dir(copy_run(base, tmp_path / "run"), 4)
    assert checkpoint.verify(ck).ok
    damage(ck)
    v = checkpoint.verify(ck)
    assert not v.ok and v.slug == slug and v.reason.startswith(reason), v


def test_eval_falls_back_in_a_run_dir_and_refuses_a_named_bad_checkpoint(base, tmp_path, capsys):
    from evav.eval.load import load_checkpoint
    from tools.export import main as export_main

    run = copy_run(base, tmp_path / "run")
    newest = checkpoint.step_dir(run, 4)
    reason = truncate(newest)
    assert load_checkpoint(run).step == 2  # the previous one, and nothing renamed
    assert newest.is_dir() and checkpoint.set_aside_dirs(run) == []
    with pytest.raises(checkpoint.CheckpointError) as e:
        load_checkpoint(newest)
    assert str(e.value) == f"{newest}: fails verification: {reason}"
    assert export_main([str(newest), "--out", str(tmp_path / "x")]) == 2
    assert f"export: error: {newest}: fails verification: {reason}" in capsys.readouterr().err


def test_step_names_of_any_width_sort_by_number(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ["step_999999999", "step_1000000000", "step_00000002", "step_2", "step_x"]:
        (root / name).mkdir(parents=True)
        (root / name / checkpoint.MARKER).write_text("{}")
    (root / "step_00000003").mkdir()  # uncommitted
    (root / "step_00000005.bad-size-20260101T000000").mkdir()
    (root / "step_00000005.bad-size-20260101T000000" / checkpoint.MARKER).write_text("{}")
    assert steps(tmp_path) == [2, 999_999_999, 1_000_000_000]  # step_2: not the canonical name
    assert checkpoint.step_of("step_100000000") == 100_000_000
    assert checkpoint.step_of("step_00000007") == 7
    assert [checkpoint.step_of(n) for n in ("step_7", "step_-0000001", "step_0000000a")] == [
        None,
        None,
        None,
    ]


def test_a_legacy_marker_without_hashes_loads_unverified_and_is_never_counted(
    base,
    shards,
    tmp_path,
):
    run = copy_run(base, tmp_path / "run")
    ck = checkpoint.step_dir(run, 4)
    # as evav wrote it before checkpoints were hashed: no file list, numpy's RNG state array
    state = checkpoint.read_state(ck)
    state["rng"] = [{**r, "numpy": np.random.get_state()} for r in state["rng"]]
    torch.save(state, ck / "train_state.pt")
    (ck / checkpoint.MARKER).write_text(json.dumps({"step": 4, "time": 1.0, "world_size": 1}))
    v = checkpoint.verify(ck)
    assert v.ok and v.legacy and "lists no files" in v.reason

    done = run_train(run, shards, "steps=6", "ckpt_every=2", "keep_last=2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"checkpoint {ck}: COMPLETE lists no files" in done.stdout and "unverified" in (
        done.stdout
    )
    assert f"resumed from {ck} at step 4" in done.stdout
    # keep_last=2 verified: 6 and 2; the legacy 4 between them is kept but not counted
    assert steps(run) == [2, 4, 6]


def test_when_no_checkpoint_verifies_resume_refuses_until_the_set_aside_ones_are_moved(
    base,
    shards,
    tmp_path,
):
    run = copy_run(base, tmp_path / "run")
    for s in (2, 4):
        truncate(checkpoint.step_dir(run, s))
    for _ in range(2):  # the refusal stands on a rerun: the set-aside ones are still there
        done = run_train(run, shards, "steps=6", "ckpt_every=2")
        assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
        assert f"evav train: error: {run / 'checkpoints'}: no checkpoint here verifies" in (
            done.stderr
        )
        assert "move the set-aside directories out of" in done.stderr
        assert steps(run) == []
    aside = tmp_path / "aside"
    aside.mkdir()
    for p in checkpoint.set_aside_dirs(run):
        p.rename(aside / p.name)
    assert sorted(p.name.split(".")[0] for p in aside.iterdir()) == [
        "step_00000002",
        "step_00000004",
    ]
    fresh = run_train(run, shards, "steps=2", "ckpt_every=2")
    assert fresh.returncode == 0 and "resumed from" not in fresh.stdout, fresh.stdout[-3000:]
    assert steps(run) == [2]


class Payload:
    """A planted pickle payload: unpickling it with weights_only=False runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("rel", ["train_state.pt", MODEL_STATES, OPTIM_SHARD])
def test_a_planted_pickle_payload_is_refused_by_resume_eval_and_export_and_never_runs(
    base_zero1,
    shards,
    tmp_path,
    capsys,
    rel,
):
    from evav.distributed import consolidated_state_dict, engine_safe_globals
    from evav.eval.load import load_checkpoint
    from tools.export import main as export_main

    run = copy_run(base_zero1, tmp_path / "run")
    ck = checkpoint.step_dir(run, 2)
    ran = tmp_path / "payload-ran"
    obj = checkpoint.safe_load(ck / rel, engine_safe_globals())
    obj["extra"] = Payload(ran)
    torch.save(obj, ck / rel)
    rehash(ck, rel)  # the hashes match: verification passes, the load itself is what is tested
    assert checkpoint.verify(ck).ok
    where = str(ck / rel)

    done = run_train(run, shards, "steps=3", "ckpt_every=3", "engine.zero_stage=1")
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"evav train: error: {where}: refused to unpickle" in done.stderr
    assert "posix.system" in done.stderr
    assert not ran.exists()

    with pytest.raises(checkpoint.UnsafeCheckpointError, match="refused to unpickle") as e:
        load_checkpoint(run)  # what `evav eval` and `evav generate` call
    assert e.value.path == where and not ran.exists()

    assert export_main([str(ck), "--out", str(tmp_path / "export")]) == 2
    assert f"export: error: {where}: refused to unpickle" in capsys.readouterr().err
    assert not (tmp_path / "export").exists() and not ran.exists()

    if rel.startswith("engine/"):  # DeepSpeed's own loader, without evav's check in front
        with pytest.raises(Exception, match="posix.system"):
            consolidated_state_dict(ck, "engine")
        assert not ran.exists()
    assert steps(run) == [2] and not checkpoint.set_aside_dirs(run)  # refused, not set aside
