"""evav.data on real shards: batch shapes and masks, mixing, exact resume, world-size changes, bad data.

Shards are built once per session by `evav preprocess` (in-process) from the raw folders of
the ``raw_sources`` fixture: made stand-ins (tests/made_sources.py) always, and slices of
../shared/datasets when present (each test runs on both): fsdd (40 train clips of 4 frames),
sst2 (40, at most 7 frames: max_words=4), video (6 pretraining clips of 7 frames, H.264) and
synthetic (30 clips, 5 tasks, 4-8 frames). Tests that damage a shard work on a copy.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from evav.cli import main
from evav.codec import decode_clip, encode_clip
from evav.data import DataConfig, Loader
from evav.data.clips import crop_window
from evav.data.order import DatasetOrder, mix_choices
from evav.data.shards import index_shard
from evav.manifest import SampleMeta, load_manifest

NAMES = ("fsdd", "sst2", "video", "synthetic")


@pytest.fixture(scope="session")
def shards(raw_sources, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards")
    src = raw_sources
    builds = {
        "fsdd": ["--src", str(src["fsdd"]), "--limit", "40", "--shard-samples", "8"],
        # max_words=4: SST-2 clips of at most 7 frames, so that some batches are shorter than
        # 8 whatever rows the (stratified, seeded) --limit draws
        "sst2": ["--src", str(src["sst2"]), "--limit", "40", "--shard-samples", "8"]
        + ["max_words=4"],
        "video": ["--src", str(src["videos"]), "num_frames=6", "--shard-samples", "4"],
        "synthetic": ["train_per_task=6", "val_per_task=2", "--shard-samples", "8"],
    }
    for name, args in builds.items():
        assert main(["preprocess", name, "--out", str(root / name), *args]) == 0
    return {name: root / name for name in builds}


def samples_of(directory: Path, split: str = "train") -> dict[str, tuple[dict, bytes]]:
    """key -> (metadata, mp4 bytes) of every sample of a split."""
    out = {}
    for sh in load_manifest(directory).splits[split].shards:
        with tarfile.open(directory / sh.path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                key = name[: -len(".json")]
                out[key] = (json.loads(data), members[f"{key}.mp4"])
    return out


def loader(dirs, batch_size=4, **kw) -> Loader:
    opts = {k: kw.pop(k) for k in list(kw) if k in DataConfig.__dataclass_fields__}
    return Loader(DataConfig(train=[str(d) for d in dirs], **opts), batch_size=batch_size, **kw)


def take(ld: Loader, n: int) -> list[dict]:
    out = []
    for batch in ld:
        out.append(batch)
        if len(out) == n:
            break
    return out


def keys(batches) -> list[str]:
    return [f"{t}/{k}" for b in batches for t, k in zip(b["task"], b["key"])]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


@pytest.mark.parametrize("pad_to,num_workers", [("clip_frames", 0), ("longest", 0), ("longest", 1)])
def test_batches_have_shapes_masks_and_the_decoded_frames(shards, pad_to, num_workers):
    ld = loader(
        [shards[n] for n in NAMES],
        batch_size=6,
        clip_frames=8,
        pad_to=pad_to,
        num_workers=num_workers,
    )
    meta = {n: samples_of(shards[n]) for n in NAMES}
    by_task = {t: n for n in NAMES for t in load_manifest(shards[n]).splits["train"].tasks}
    seen, lengths = 0, set()
    for batch in take(ld, 6):
        clip_t = [
            min(meta[by_task[t]][k][0]["num_frames"], 8)
            for t, k in zip(batch["task"], batch["key"])
        ]
        bt = 8 if pad_to == "clip_frames" else max(clip_t)  # longest: no all-padding frame
        lengths.add(bt)
        assert batch["frames"].shape == (6, bt, 64, 64, 3) and batch["frames"].dtype == torch.uint8
        assert batch["loss_mask"].shape == batch["pad_mask"].shape == (6, bt)
        assert batch["task_id"].tolist() == [ld.task_names.index(t) for t in batch["task"]]
        for i, (task, key) in enumerate(zip(batch["task"], batch["key"])):
            m, mp4 = meta[by_task[task]][key]
            t = clip_t[i]
            pad, loss = batch["pad_mask"][i].numpy(), batch["loss_mask"][i].numpy()
            assert pad.tolist() == [j >= t for j in range(bt)]
            assert not batch["frames"][i][t:].any()  # padding is black
            assert not (loss & pad).any()
            if m["supervise"] == "all":  # pretraining: every frame but the task frame
                assert loss[:t].sum() >= t - 1
            else:  # the answer frames: the clip's last `output` frames (kept by cropping)
                out = m["segments"]["output"]
                assert loss.tolist() == [t - out <= j < t for j in range(bt)]
                assert batch["answer"][i] == m["answer"]
            clip = decode_clip(mp4, "pyav")
            if m["num_frames"] <= 8:
                assert np.array_equal(batch["frames"][i][:t].numpy(), clip)
            elif m["supervise"] != "all":  # task frame, the middle of the input, the answer
                pieces = crop_window(SampleMeta.from_dict(m), len(clip), 8, 0, key)
                keep = [j for a, b in pieces for j in range(a, b)]
                assert keep[0] == 0 and keep[-1] == len(clip) - 1
                assert np.array_equal(batch["frames"][i][:8].numpy(), clip[keep])
            seen += 1
    assert seen == 36
    assert len(lengths) > 1 if pad_to == "longest" else lengths == {8}
    assert set(ld.task_names) == set(by_task)
    assert ld.frame_size == (64, 64)


def test_decord_and_pyav_give_the_same_batches(shards):
    dirs = [shards["synthetic"], shards["video"], shards["sst2"]]
    a = take(loader(dirs, clip_frames=8, decoder="pyav"), 4)
    b = take(loader(dirs, clip_frames=8, decoder="decord"), 4)
    assert_same_batches(a, b)


def test_mix_choices_follow_the_weights_over_many_slots():
    probs = np.array([0.6, 0.3, 0.1])
    counts = np.bincount(
        np.concatenate([mix_choices(0, s, 64, probs) for s in range(0, 64_000, 64)])
    )
    assert np.abs(counts / counts.sum() - probs).max() < 0.01


@pytest.mark.parametrize("mix_by", ["samples", "frames"])
def test_realised_mix_matches_the_weights(shards, mix_by):
    # fsdd clips have 4 frames, sst2 clips 7-19 (13 on average): the two modes differ a lot.
    ld = loader(
        [shards["fsdd"], shards["sst2"]],
        batch_size=16,
        weights=[3, 1],
        mix_by=mix_by,
        clip_frames=32,
    )
    take(ld, 25)  # 400 samples
    mix = ld.stats()
    assert abs(mix["data/mix/fsdd"] - 0.75) < 0.07, mix
    assert abs(mix["data/mix/sst2"] - 0.25) < 0.07, mix
    assert mix["data/skipped"] == 0


def test_datasets_cycle_independently(shards):
    """The 6-clip video set cycles through epochs (reshuffled) while the other streams on."""
    ld = loader([shards["video"], shards["sst2"]], batch_size=8, clip_frames=8)
    videos = [k for k in keys(take(ld, 4)) if k.startswith("video/")]
    assert len(videos) >= 12  # about half of 32: two epochs of video at least
    epochs = [videos[i : i + 6] for i in range(0, 12, 6)]
    assert all(sorted(e) == sorted(epochs[0]) and len(set(e)) == 6 for e in epochs)
    assert epochs[0] != epochs[1]  # each epoch has its own order


@pytest.fixture(scope="module")
def reference(shards):
    """Ten batches of a 3-dataset mix with no workers, uninterrupted (enough that every worker of
    the resumed loaders below reuses its shared-memory slots, see evav/data/handoff.py)."""
    dirs = [shards["synthetic"], shards["fsdd"], shards["video"]]
    return dirs, take(loader(dirs, batch_size=5, clip_frames=6, seed=3), 10)


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_resume_after_n_batches_is_exact(reference, num_workers):
    dirs, ref = reference
    first = loader(dirs, batch_size=5, clip_frames=6, seed=3, num_workers=num_workers)
    head = take(first, 2)
    state = first.state_dict()
    assert len(json.dumps(state)) < 300  # positions and a seed, no data
    resumed = loader(dirs, batch_size=5, clip_frames=6, seed=3, num_workers=num_workers)
    resumed.load_state_dict([state])
    assert_same_batches(head + take(resumed, 8), ref)


def run_ranks(dirs, world: int, batch_size: int, num_batches: int, states=None, saved_world=None):
    """Simulate `world` ranks: every rank's batches (global order: rank by rank per step) and states."""
    out, new_states = [], []
    loaders = [loader(dirs, batch_size, rank=r, world_size=world) for r in range(world)]
    per_rank = []
    for ld in loaders:
        if states is not None:
            ld.load_state_dict(states, saved_world)
        per_rank.append(take(ld, num_batches))
        new_states.append(ld.state_dict())
    for step in range(num_batches):
        out += [per_rank[r][step] for r in range(world)]
    return keys(out), new_states


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_world_size_change_continues_the_epoch_with_no_loss_or_repeat(shards, before, after):
    dirs = [shards["fsdd"]]  # 40 samples: one epoch = 40 keys
    whole, _ = run_ranks(dirs, 1, 4, 10)
    head, states = run_ranks(dirs, before, 4 // before, 4)  # 16 samples at world `before`
    tail, _ = run_ranks(dirs, after, 4 // after, 6, states, before)  # the other 24
    assert Counter(head + tail) == Counter(whole) and len(set(whole)) == 40
    assert head + tail == whole  # the same global sequence, not just the same set


def test_validation_split_is_read_once_across_ranks_in_lockstep(shards):
    dirs = [shards["synthetic"], shards["sst2"]]
    want = [f"{m['task']}/{k}" for d in dirs for k, (m, _) in samples_of(d, "val").items()]
    got, per_rank = [], []
    for rank in range(2):
        ld = loader(dirs, 3, split="val", rank=rank, world_size=2, infinite=False)
        batches = list(ld)
        per_rank.append(len(batches))
        got += [k for k in keys(batches) if k != "/"]  # "/": a placeholder (no task, no key)
    assert Counter(got) == Counter(want)
    # every rank takes every global batch (one with no sample left: an all-padding placeholder),
    # so no rank waits alone in a collective
    assert per_rank == [-(-len(want) // 6)] * 2


def copy_dataset(src: Path, dst: Path) -> tuple[Path, Path]:
    shutil.copytree(src, dst)
    return dst, dst / load_manifest(dst).splits["train"].shards[1].path


def rewrite_member(shard: Path, which: int, change) -> str:
    """Rewrite the shard with sample `which`'s mp4 replaced by change(bytes); returns its key."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    mp4s = [i for i, (m, _) in enumerate(members) if m.name.endswith(".mp4")]
    i = mp4s[which]
    members[i] = (members[i][0], change(members[i][1]))
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return members[i][0].name[: -len(".mp4")]


def read_epoch(directory: Path, **kw) -> tuple[list[str], dict]:
    ld = loader([directory], batch_size=8, infinite=False, **kw)
    got = keys(list(ld))
    return got, ld.stats()


def test_corrupt_member_is_skipped_counted_and_logged(shards, tmp_path, caplog):
    d, shard = copy_dataset(shards["fsdd"], tmp_path / "fsdd")

    def flip(data: bytes) -> bytes:  # bytes inside the coded frames: the clip checksum fails
        b = bytearray(data)
        for k in range(len(b) // 3, len(b) // 3 + 16):
            b[k] ^= 0xFF
        return bytes(b)

    bad = rewrite_member(shard, 2, flip)
    with caplog.at_level(logging.WARNING, logger="evav.data.loader"):
        got, stats = read_epoch(d)
    assert sorted(got) == sorted(f"fsdd/{k}" for k in samples_of(shards["fsdd"]) if k != bad)
    assert stats["data/skipped"] == 1
    assert any(
        str(shard) in r.message and bad in r.message and "checksum" in r.message
        for r in caplog.records
    )


def test_truncated_clip_is_counted_as_bad(shards, tmp_path):
    d, shard = copy_dataset(shards["fsdd"], tmp_path / "fsdd")
    bad = rewrite_member(
        shard, 0, lambda data: encode_clip(decode_clip(data)[:-1])
    )  # 3 of 4 frames
    got, stats = read_epoch(d)
    assert len(got) == 39 and f"fsdd/{bad}" not in got
    assert stats["data/skipped"] == 1


def test_tar_cut_at_a_header_boundary_is_counted_as_bad(shards, tmp_path):
    d, shard = copy_dataset(shards["fsdd"], tmp_path / "fsdd")
    idx = index_shard(shard)
    cut = (
        min(m.offset for m in idx.members[5].values()) - 512
    )  # the header of sample 5's first member
    with open(shard, "r+b") as f:
        f.truncate(cut)
    got, stats = read_epoch(d)
    assert len(got) == 40 - 3 and stats["data/skipped"] == 3  # samples 5, 6, 7 are gone


def test_missing_shard_is_a_clear_error_at_start(shards, tmp_path):
    d, shard = copy_dataset(shards["fsdd"], tmp_path / "fsdd")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="missing.*shard-000001.tar"):
        loader([d])


def test_pipe_urls_are_refused(shards, tmp_path):
    with pytest.raises(ValueError, match="pipe"):
        loader(["pipe:curl -s http://x/"])
    d, _ = copy_dataset(shards["fsdd"], tmp_path / "fsdd")
    m = json.loads((d / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["path"] = "pipe:cat train/shard-000000.tar"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="pipe"):
        loader([d])


def test_order_is_a_permutation_per_epoch_and_independent_of_ranks():
    order = DatasetOrder("x", [8, 8, 5, 8, 3], seed=1, window=2)
    epoch0 = [order.locate(i) for i in range(32)]
    assert len(set(epoch0)) == 32 and {e for e, _, _ in epoch0} == {0}
    assert {(s, m) for _, s, m in epoch0} == {
        (s, m) for s, n in enumerate([8, 8, 5, 8, 3]) for m in range(n)
    }
    epoch1 = [order.locate(i)[1:] for i in range(32, 64)]
    assert epoch1 != [x[1:] for x in epoch0] and set(epoch1) == {x[1:] for x in epoch0}
