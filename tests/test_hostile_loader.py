"""evav.data against hostile shards: every kind of bad sample is skipped, counted by kind and
logged; an all-bad stream stops with a clear error; a preemption signal is honoured while the
trainer waits for data; datasets of different RenderSpecs are refused.

Shards are built here with `preprocessing.runner.build` on the synthetic builder (10 train clips
in shards of 4, 4 and 2; FFV1, or H.264 4:4:4), then damaged on a copy by each test. Every case
asserts which samples were skipped, the count per kind (``data/skipped/KIND``), and the log line
(shard path, key, kind, reason); the core cases run without workers and with two.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import evav.data.loader as loader_mod
from evav import checkpoint
from evav.codec import decode_clip, encode_clip
from evav.data import DataConfig, DataExhaustedError, Loader
from evav.data.clips import BadSample, decode, make_sample
from evav.data.order import mix_choices
from evav.manifest import clip_checksum, load_manifest
from evav.metrics import read_metrics
from preprocessing.runner import BuildConfig, build

REPO = Path(__file__).resolve().parents[1]
BAD = "00000006"  # the sample most cases damage: the third of train shard 1 (keys 4-7)


def build_synthetic(out: Path, **kw) -> Path:
    options = {"train_per_task": 2, "val_per_task": 1}
    build(BuildConfig("synthetic", out=str(out), options=options, shard_samples=4, **kw))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    return {
        "ffv1": build_synthetic(root / "ffv1"),
        "h264": build_synthetic(root / "h264", codec="h264-444-qp0"),
        "small": build_synthetic(root / "small", render={"height": 32, "width": 32}),
    }


@pytest.fixture(autouse=True)
def fresh_log_limit(monkeypatch):
    """The bad-sample log is rate-limited per process: start each test from the first line."""
    monkeypatch.setattr(loader_mod, "_bad_logged", 0)


# -- shard surgery ---------------------------------------------------------------------------
def shard(d: Path, i: int, split: str = "train") -> Path:
    return d / load_manifest(d).splits[split].shards[i].path


def read_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def write_members(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def edit_sample(d: Path, key: str, change) -> None:
    """Rewrite sample ``key`` of train shard 1: ``change({ext: bytes})`` returns its new members
    (an extension left out is a member removed)."""
    path = shard(d, 1)
    members = read_members(path)
    mine = {n.split(".", 1)[1]: members.pop(n) for n in list(members) if n.startswith(key + ".")}
    new = change(dict(mine))
    out = {}
    for name, data in read_members(path).items():
        k, ext = name.split(".", 1)
        if k == key:
            if ext in new:
                out[name] = new[ext]
        else:
            out[name] = data
    write_members(path, out)


def with_json(change):
    """A sample edit that rewrites KEY.json as ``change(metadata)`` (a dict, or raw bytes)."""

    def edit(m):
        meta = json.loads(m["json"])
        new = change(meta)
        m["json"] = new if isinstance(new, bytes) else json.dumps(new or meta).encode()
        return m

    return edit


def with_clip(frames_fn, rehash: bool = True):
    """Re-encode the clip as ``frames_fn(frames)``, with clip_sha256 fixed to match."""

    def edit(m):
        m["mp4"] = encode_clip(np.ascontiguousarray(frames_fn(decode_clip(m["mp4"], "pyav"))))
        if rehash:
            meta = json.loads(m["json"])
            meta["clip_sha256"] = clip_checksum(m["mp4"])
            m["json"] = json.dumps(meta).encode()
        return m

    return edit


def flip(m):
    b = bytearray(m["mp4"])
    for k in range(len(b) // 3, len(b) // 3 + 16):
        b[k] ^= 0xFF
    m["mp4"] = bytes(b)
    return m


def garbage_clip(m):
    m["mp4"] = bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8))
    meta = json.loads(m["json"])
    meta["clip_sha256"] = clip_checksum(m["mp4"])
    m["json"] = json.dumps(meta).encode()
    return m


def swap_with_other(d: Path):
    other = read_members(shard(d, 0))["00000001.mp4"]  # a different clip (another task)

    def edit(m):
        assert other != m["mp4"]
        m["mp4"] = other
        return m

    return edit


def drop(ext: str):
    return lambda m: {k: v for k, v in m.items() if k != ext}


def huge_num_frames(meta):
    meta["num_frames"] = 10**12
    meta["segments"] = {"task": 1, "input": 10**12 - 1}


def cut_inside_clip(d: Path) -> None:
    path = shard(d, 1)
    with tarfile.open(path) as tar:
        m = tar.getmember(f"{BAD}.mp4")
    with open(path, "r+b") as f:
        f.truncate(m.offset_data + m.size // 2)


def replace_shard(make):
    def damage(d: Path) -> None:
        path = shard(d, 1)
        path.unlink()
        make(path)

    return damage


@dataclass
class Case:
    name: str
    damage: object  # (d) -> None, or a sample edit for BAD
    kind: str | None
    message: str  # in the log line of the first bad sample
    bad: tuple[str, ...] = (BAD,)  # keys skipped
    logged_key: str = BAD  # the key as the log line names it
    dataset: str = "ffv1"
    after_start: bool = False  # damaged after the Loader was built (its shards already listed)


WHOLE_SHARD = tuple(f"{k:08d}" for k in range(4, 8))
CASES = [
    Case(
        "json-list", with_json(lambda m: b"[1, 2]"), "bad_metadata", "expected an object, got list"
    ),
    Case(
        "json-missing-field",
        with_json(lambda m: m.pop("clip_sha256") and None),
        "bad_metadata",
        "missing field(s) clip_sha256",
    ),
    Case(
        "json-wrong-type",
        with_json(lambda m: m.update(num_frames=str(m["num_frames"]))),
        "bad_metadata",
        "metadata field num_frames is str, not int",
    ),
    Case(
        "json-not-utf8",
        with_json(lambda m: b'{"key": "\xff\xfe"}'),
        "bad_metadata",
        "not JSON (UnicodeDecodeError",
    ),
    Case(
        "json-nested-100000-deep",
        with_json(lambda m: b"[" * 100_000),
        "bad_metadata",
        "not JSON (RecursionError",
    ),
    Case(
        "json-int-of-5000-digits",
        with_json(
            lambda m: (
                json.dumps(m)
                .replace('"num_frames":', '"num_frames": ' + "9" * 5000 + ",", 1)
                .encode()
            )
        ),
        "bad_metadata",
        "Exceeds the limit",
    ),
    Case(
        "json-huge-num-frames",
        with_json(huge_num_frames),
        "frame_count",
        "metadata says 1000000000000",
    ),
    Case("mp4-missing", drop("mp4"), "missing_member", "has ['json'], needs mp4 and json"),
    Case("json-missing", drop("json"), "missing_member", "has ['mp4'], needs mp4 and json"),
    Case("ffv1-bytes-flipped", flip, "checksum", "clip checksum mismatch"),
    Case("h264-bytes-flipped", flip, "checksum", "clip checksum mismatch", dataset="h264"),
    Case("mp4-swapped", swap_with_other, "checksum", "clip checksum mismatch"),
    Case(
        "frame-dropped-rehashed",
        with_clip(lambda f: f[:-1]),
        "frame_count",
        "frames, metadata says",
    ),
    Case(
        "frames-32x32-rehashed",
        with_clip(lambda f: f[:, :32, :32]),
        "frame_size",
        "frame size (32, 32), dataset renders (64, 64)",
    ),
    Case("mp4-garbage-rehashed", garbage_clip, "decode", "undecodable clip"),
    Case(
        "render-hash-changed",
        with_json(lambda m: m.update(render_hash="0" * 64)),
        "render_hash",
        "rendered with hash 0000000000000000, the dataset's is",
    ),
    Case(
        "tar-cut-inside-a-clip",
        cut_inside_clip,
        "missing_sample",
        "the shard ends inside this sample's data",
        bad=(BAD, "00000007"),
    ),
    Case(
        "json-of-17-MiB",
        with_json(lambda m: json.dumps({**m, "extra": {"pad": "x" * 17 * 2**20}}).encode()),
        "read_error",
        "over the 16777216-byte limit",
    ),
    Case(
        "garbage-appended",
        lambda d: shard(d, 1).open("ab").write(b"\x07" * 5000),
        None,
        "",
        bad=(),
    ),
    Case(
        "shard-replaced-by-a-directory",
        replace_shard(lambda p: p.mkdir()),
        "read_error",
        "a directory, not a shard file",
        bad=WHOLE_SHARD,
        logged_key="member #0",
        after_start=True,
    ),
    Case(
        "shard-deleted",
        lambda d: shard(d, 1).unlink(),
        "read_error",
        "No such file or directory",
        bad=WHOLE_SHARD,
        logged_key="member #0",
        after_start=True,
    ),
    Case(
        "shard-emptied",
        lambda d: shard(d, 1).write_bytes(b""),
        "read_error",
        "unreadable tar: empty file",
        bad=WHOLE_SHARD,
        logged_key="member #0",
        after_start=True,
    ),
    Case(
        "shard-replaced-by-a-fifo",
        replace_shard(os.mkfifo),
        "read_error",
        "not a regular file, not a shard file",
        bad=WHOLE_SHARD,
        logged_key="member #0",
        after_start=True,
    ),
]


def data_loader(dirs, num_workers=0, batch_size=4, **kw) -> Loader:
    opts = {k: kw.pop(k) for k in list(kw) if k in DataConfig.__dataclass_fields__}
    cfg = DataConfig(train=[str(d) for d in dirs], num_workers=num_workers, clip_frames=8, **opts)
    return Loader(cfg, batch_size=batch_size, **kw)


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail instead of hanging: SIGALRM interrupts even a blocked system call."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def all_keys(d: Path) -> list[str]:
    return sorted(
        n[:-5] for i in range(3) for n in read_members(shard(d, i)) if n.endswith(".json")
    )


@pytest.mark.parametrize("num_workers", [0, 2], ids=["in-process", "2-workers"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_sample_is_skipped_counted_by_kind_and_logged(
    built, tmp_path, caplog, case, num_workers
):
    d = shutil.copytree(built[case.dataset], tmp_path / case.dataset)
    want = [k for k in all_keys(d) if k not in case.bad]
    damaged = shard(d, 1)  # (the manifest is not read again: some damage makes it refuse a shard)

    def damage():
        if case.damage in (swap_with_other,):
            edit_sample(d, BAD, case.damage(d))
        elif case.name.startswith(("json-", "mp4-", "ffv1-", "h264-", "frame", "render")):
            edit_sample(d, BAD, case.damage)
        else:
            case.damage(d)

    if not case.after_start:
        damage()
    ld = data_loader([d], num_workers, infinite=False)
    if case.after_start:
        damage()
    with caplog.at_level(logging.WARNING, logger="evav.data.loader"), deadline(120):
        got = sorted(k for b in ld for k in b["key"])
        stats = ld.stats()
    assert got == want
    skipped = {k: v for k, v in stats.items() if k.startswith("data/skipped/")}
    assert stats["data/skipped"] == len(case.bad)
    assert skipped == ({f"data/skipped/{case.kind}": len(case.bad)} if case.bad else {})
    lines = [r.getMessage() for r in caplog.records if "skipped bad sample" in r.getMessage()]
    assert len(lines) == len(case.bad)
    if case.bad:
        first = f"skipped bad sample #1 ({case.kind}): {damaged} key {case.logged_key}: "
        assert lines[0].startswith(first) and case.message in lines[0], lines[0]


def test_every_single_bit_flip_of_an_h264_clip_is_caught_by_the_checksum(built):
    """Without the checksum H.264 conceals many flips (the clip decodes, with every frame);
    with it, every one of the clip's bytes flipped is a skipped sample."""
    members = read_members(shard(built["h264"], 0))
    clip, meta_json = members["00000001.mp4"], members["00000001.json"]
    num_frames = json.loads(meta_json)["num_frames"]

    def flipped(pos: int) -> bytes:
        b = bytearray(clip)
        b[pos] ^= 1 << (pos % 8)
        return bytes(b)

    kinds = set()
    for pos in range(len(clip)):
        with pytest.raises(BadSample) as e:
            make_sample({"mp4": flipped(pos), "json": meta_json}, "k", 8, (64, 64), 0)
        kinds.add(e.value.kind)
    assert kinds == {"checksum"} and len(clip) > 4000
    silent = 0
    for pos in range(0, len(clip), 11):  # what the decoder alone would have let through
        with contextlib.suppress(BadSample):
            silent += len(decode(flipped(pos))) == num_frames
    assert silent > 0.1 * len(range(0, len(clip), 11))


def test_datasets_of_different_render_specs_are_refused_naming_the_fields(built):
    with pytest.raises(ValueError) as e:
        data_loader([built["ffv1"], built["small"]])
    a, b = built["ffv1"], built["small"]
    assert str(e.value) == (
        f"{b}: rendered with height=32 ({a}: 64), width=32 ({a}: 64); "
        "mixed datasets must share one RenderSpec"
    )


def corrupt_every_clip(d: Path, split: str = "train") -> None:
    for sh in load_manifest(d).splits[split].shards:
        members = read_members(d / sh.path)
        write_members(
            d / sh.path,
            {n: (flip({"mp4": b})["mp4"] if n.endswith(".mp4") else b) for n, b in members.items()},
        )


@pytest.mark.parametrize("num_workers", [0, 2], ids=["in-process", "2-workers"])
def test_an_all_bad_dataset_stops_within_seconds_with_a_clear_error(built, tmp_path, num_workers):
    d = shutil.copytree(built["ffv1"], tmp_path / "ffv1")
    corrupt_every_clip(d)
    ld = data_loader([d], num_workers)
    t0 = time.perf_counter()
    with pytest.raises(DataExhaustedError) as e, deadline(60):
        next(iter(ld))
    assert time.perf_counter() - t0 < 30
    msg = str(e.value)
    assert msg.startswith(f"no good sample in the last 1000 read from {d}: 1000 checksum (e.g. ")
    assert f"{d}/train/shard-00000" in msg and "clip checksum mismatch" in msg
    assert msg.endswith("(data.max_bad_in_a_row=1000; 0 never stops)")
    assert ld.stats()["data/skipped/checksum"] == 1000
    assert ld.state_dict()["slot"] == 0  # nothing was handed out


@pytest.mark.parametrize("num_workers", [0, 2], ids=["in-process", "2-workers"])
def test_an_all_bad_dataset_mixed_by_weight_is_skipped_and_counted(built, tmp_path, num_workers):
    good, bad = built["ffv1"], shutil.copytree(built["ffv1"], tmp_path / "bad")
    corrupt_every_clip(bad)
    ld = data_loader([good, bad], num_workers, weights=[1, 1], seed=5)
    batches = []
    for b in ld:
        batches.append(b)
        if len(batches) == 30:
            break
    state = ld.state_dict()
    # the bad dataset filled about half of the slots read: every one skipped, none trained on
    drawn = np.concatenate([mix_choices(5, s, 4, ld.probs) for s in range(0, state["slot"], 4)])
    assert state["counts"] == [int((drawn == 0).sum()), int((drawn == 1).sum())]
    stats = ld.stats()
    assert stats["data/skipped"] == stats["data/skipped/checksum"] == state["counts"][1] > 30
    assert stats["data/mix/ffv1"] == 1.0 and stats["data/mix/bad"] == 0.0
    assert sum(len(b["key"]) for b in batches) == state["counts"][0]


def test_ranks_stay_in_lockstep_when_one_has_no_good_sample(built, tmp_path):
    """A rank whose share of a global batch is all bad trains on a placeholder (no loss) rather
    than skipping ahead: both ranks take every global batch in the same step."""
    good, bad = built["ffv1"], shutil.copytree(built["ffv1"], tmp_path / "bad")
    corrupt_every_clip(bad)
    ranks = [
        data_loader([good, bad], batch_size=1, weights=[1, 1], rank=r, world_size=2)
        for r in range(2)
    ]
    got = []
    for ld in ranks:
        it = iter(ld)
        got.append([next(it) for _ in range(12)])
    assert ranks[0].state_dict() == ranks[1].state_dict()  # the same global position
    drawn = np.concatenate([mix_choices(0, s, 2, ranks[0].probs) for s in range(0, 24, 2)])
    for r in range(2):
        placeholders = [b["key"] == [""] for b in got[r]]
        assert placeholders == [bool(d == 1) for d in drawn[r::2]]
        for b in got[r]:
            if b["key"] == [""]:
                assert b["pad_mask"].all() and not b["loss_mask"].any()
    assert sum(drawn == 1) >= 4


@pytest.mark.parametrize("num_workers", [0, 2], ids=["in-process", "2-workers"])
def test_wait_leaves_promptly_when_told_to_stop(built, tmp_path, num_workers):
    d = shutil.copytree(built["ffv1"], tmp_path / "ffv1")
    corrupt_every_clip(d)
    ld = data_loader([d], num_workers, max_bad_in_a_row=0)  # all bad, forever
    stop = threading.Event()
    batches = ld.iterate(should_stop=stop.is_set)
    t0 = time.perf_counter()
    threading.Timer(1.0, stop.set).start()
    with deadline(60):
        assert batches.wait(1) is False
    assert 1.0 <= time.perf_counter() - t0 < 3.0
    assert ld.state_dict()["slot"] == 0 and ld.stats()["data/skipped"] > 10


@pytest.mark.parametrize("num_workers", [0, 2], ids=["in-process", "2-workers"])
def test_batches_waited_for_are_not_consumed_until_handed_out(built, num_workers):
    ref = data_loader([built["ffv1"]], 0, seed=2)
    want = [next(b) for b in [iter(ref)] for _ in range(5)]
    ld = data_loader([built["ffv1"]], num_workers, seed=2)
    batches = ld.iterate()
    assert batches.wait(3) is True
    assert ld.state_dict()["slot"] == 0  # ready, not consumed: a checkpoint now resumes here
    got = [next(batches) for _ in range(5)]
    assert ld.state_dict() == ref.state_dict()
    assert [b["key"] for b in got] == [b["key"] for b in want]
    assert all(torch.equal(a["frames"], b["frames"]) for a, b in zip(got, want))


def test_polling_worker_batches_loses_and_repeats_none(built, monkeypatch):
    """With workers, a wait gives up every _POLL_S to check should_stop, and polls again; made
    very short here, most gets time out before a batch is there: the batches are the same."""
    want = [next(b) for b in [iter(data_loader([built["ffv1"]], 0, seed=4))] for _ in range(8)]
    monkeypatch.setattr(loader_mod, "_POLL_S", 0.001)
    got = [next(b) for b in [iter(data_loader([built["ffv1"]], 2, seed=4))] for _ in range(8)]
    assert [b["key"] for b in got] == [b["key"] for b in want]
    assert all(torch.equal(a["frames"], b["frames"]) for a, b in zip(got, want))


@pytest.mark.parametrize("value", [-1, 1.5, True, "10"])
def test_max_bad_in_a_row_must_be_a_count(built, value):
    with pytest.raises(
        ValueError, match=f"data.max_bad_in_a_row must be an int >= 0, got {value!r}"
    ):
        data_loader([built["ffv1"]], max_bad_in_a_row=value)


# -- through the trainer ---------------------------------------------------------------------
TRAIN = [
    "configs/debug.yaml",
    "micro_batch=4",
    "log_every=1",
    "val_every=0",
    "ckpt_every=0",
    "metrics.enabled=false",
    "optim.warmup_steps=2",
]


def run_train(run_dir: Path, data: Path, *extra: str, wait: bool = True):
    """``evav train`` (evav.train.train) in its own process: DeepSpeed keeps process-wide state
    that a second engine in the same process trips over."""
    cmd = [sys.executable, "-m", "evav.cli", "train", *TRAIN, f"data.train=[{data}]"]
    cmd += [f"run_dir={run_dir}", *extra]
    if wait:
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_training_on_all_corrupt_shards_stops_with_the_clear_error(built, tmp_path):
    d = shutil.copytree(built["ffv1"], tmp_path / "ffv1")
    corrupt_every_clip(d)
    t0 = time.perf_counter()
    done = run_train(tmp_path / "run", d, "steps=3")
    assert time.perf_counter() - t0 < 180  # a hang guard, not a speed check
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]  # one error line, no traceback
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert last.startswith(
        "evav train: error: no good sample in the last 1000 read from "
        f"{d}: 1000 checksum (e.g. {d}/train/shard-00000"
    ), last
    assert last.endswith(
        "clip checksum mismatch (the KEY.mp4 bytes differ from clip_sha256)) "
        "(data.max_bad_in_a_row=1000; 0 never stops)"
    )
    assert "skipped bad sample #1 (checksum)" in done.stdout
    assert not checkpoint.complete_checkpoints(tmp_path / "run")


def test_validation_reports_the_samples_it_skipped(built, tmp_path):
    d = shutil.copytree(built["ffv1"], tmp_path / "ffv1")
    corrupt_every_clip(d, "val")  # 5 val samples: fewer than max_bad_in_a_row, so no error
    done = run_train(tmp_path / "run", d, "steps=2", "val_every=2", "val_batches=4")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    records = read_metrics(tmp_path / "run")
    val = [r for r in records if "val/skipped" in r]
    assert [(r["step"], r["val/skipped"], r["val/skipped/checksum"]) for r in val] == [(2, 5, 5)]
    assert "val/loss" not in val[0]  # nothing left to score
    assert [r["data/skipped"] for r in records if "train/loss" in r] == [0, 0]


def steps_logged(run_dir: Path) -> list[int]:
    return (
        [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
        if (run_dir / "metrics.jsonl").exists()
        else []
    )


def test_sigterm_while_waiting_for_data_checkpoints_and_exits_75(built, tmp_path):
    """The data goes bad under a running job (every clip rewritten in place): the trainer waits
    for good data (max_bad_in_a_row=0: forever); SIGTERM stops it at the last step, checkpointed.
    Resumed on the still-bad data, it is stopped again before its first step, with nothing new
    to save (its resume point is the checkpoint it loaded)."""
    d = shutil.copytree(built["ffv1"], tmp_path / "ffv1")
    run = tmp_path / "run"
    proc = run_train(run, d, "steps=1000", "data.max_bad_in_a_row=0", wait=False)
    try:
        deadline_s = time.time() + 300
        while time.time() < deadline_s and len(steps_logged(run)) < 2:
            time.sleep(0.1)
        corrupt_every_clip(d)
        last, since = steps_logged(run)[-1], time.time()
        while time.time() - since < 4:  # no new step for 4 s: it is waiting for data
            time.sleep(0.2)
            if steps_logged(run)[-1] != last:
                last, since = steps_logged(run)[-1], time.time()
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 75, out[-3000:]
    assert time.time() - t0 < 20
    assert "stopped waiting for data: 0 of 1 batches ready" in out
    assert f"stopping at step {last} after SIGTERM" in out
    ((step, path),) = checkpoint.complete_checkpoints(run)
    assert step == last
    state = checkpoint.read_state(path)
    assert state["loader"][0]["slot"] == 4 * last  # exactly the batches trained on

    again = run_train(run, d, "steps=1000", "data.max_bad_in_a_row=0", wait=False)
    try:
        while "resumed from" not in (line := again.stdout.readline()):
            assert line, "the resumed run ended early"
        time.sleep(2)  # into the wait for its first step's data
        again.send_signal(signal.SIGTERM)
        out, _ = again.communicate(timeout=60)
    finally:
        again.kill()
    assert again.returncode == 75, out[-3000:]
    assert f"stopping at step {last} after SIGTERM" in out
    assert checkpoint.complete_checkpoints(run) == [(step, path)]
