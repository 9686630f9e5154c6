"""`evav inspect --verify` on a real synthetic build, corrupted by hand one way per test.

The dataset is built once per module with preprocessing.runner.build (no downloads): 6 samples,
train in two shards of 2, val in one shard of 2. Each test copies it, breaks it, runs the CLI
in-process (evav.cli.main) and asserts the exit status, the exact per-reason counts of the
summary, and the line naming the broken shard and key. Plain `evav inspect` is checked to warn
(not crash) on the same damage.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from evav.cli import main
from evav.codec import CodecSpec, decode_clip, encode_clip
from evav.data.shards import index_shard
from evav.manifest import clip_checksum, load_manifest
from preprocessing.inspect import REASONS, verify
from preprocessing.runner import BuildConfig, build

T0 = "train/shard-000000.tar"  # keys 00000000, 00000001
T1 = "train/shard-000001.tar"  # keys 00000002, 00000003
V0 = "val/shard-000000.tar"  # keys 00000000, 00000001


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inspect") / "d"
    m = build(
        BuildConfig(
            "synthetic",
            str(out),
            options={"tasks": ["add", "count"], "train_per_task": 2, "val_per_task": 1},
            shard_samples=2,
        )
    )
    assert m is not None and [sh.path for s in m.splits.values() for sh in s.shards] == [
        T0,
        T1,
        V0,
    ]
    return out


@pytest.fixture
def d(built, tmp_path) -> Path:
    dst = tmp_path / "d"
    shutil.copytree(built, dst)
    return dst


def run(path: Path, capsys, *extra: str) -> tuple[int, str, dict[str, int]]:
    """``evav inspect PATH --verify``: (exit status, stdout, reason -> count from the summary)."""
    capsys.readouterr()
    rc = main(["inspect", str(path), "--verify", *extra])
    out = capsys.readouterr().out
    counts = {}
    if "problem(s):" in out:
        for line in out.split("problem(s):\n", 1)[1].splitlines():
            reason, n = line.strip().rsplit(None, 1)
            counts[reason] = int(n)
    return rc, out, counts


# -- tar surgery (the writer's header conventions: USTAR, mtime 0, mode 0644) --------------------
def members(shard: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(shard) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def write_tar(shard: Path, items: list[tuple[str, bytes]]) -> None:
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))


def rewrite(shard: Path, change: Callable[[dict[str, bytes]], dict[str, bytes]]) -> None:
    """Rewrite a shard with its {name: bytes} members passed through ``change`` (order kept)."""
    write_tar(shard, list(change(dict(members(shard))).items()))


def xor_at(path: Path, offset: int, n: int = 1) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(n)
        f.seek(offset)
        f.write(bytes(x ^ 0xFF for x in b))


def member_at(shard: Path, sample: int, ext: str):
    return index_shard(shard).members[sample][ext]


def set_meta(items: dict[str, bytes], which: str, **fields) -> dict[str, bytes]:
    meta = json.loads(items[f"{which}.json"])
    meta.update(fields)
    items[f"{which}.json"] = json.dumps(meta).encode()
    return items


def reencode(items: dict[str, bytes], key: str, d: Path, edit) -> dict[str, bytes]:
    """Replace KEY.mp4 by edit(decoded frames) re-encoded with the dataset's codec, and give
    KEY.json the new clip's checksum: only decoding can tell."""
    codec = CodecSpec.parse(load_manifest(d).codec)
    clip = encode_clip(edit(decode_clip(items[f"{key}.mp4"], "pyav")), codec)
    items[f"{key}.mp4"] = clip
    return set_meta(items, key, clip_sha256=clip_checksum(clip))


# -- the hostile cases -------------------------------------------------------------------------
def flip_clip(d):
    m = member_at(d / T0, 1, "mp4")
    xor_at(d / T0, m.offset + m.size // 2, 8)


def flip_json(d):
    xor_at(d / T0, member_at(d / T0, 1, "json").offset)  # '{' -> not UTF-8


def cut_at_header(d):
    m = min(index_shard(d / T0).members[1].values(), key=lambda m: m.offset)  # its first member
    (d / T0).write_bytes((d / T0).read_bytes()[: m.offset - 512])


def cut_mid_member(d):
    m = member_at(d / T0, 1, "mp4")
    (d / T0).write_bytes((d / T0).read_bytes()[: m.offset + 100])


def delete_shard(d):
    (d / T1).unlink()


def append_garbage(d):
    with open(d / T0, "ab") as f:
        f.write(b"garbage after the end of the archive")


def scribble_in_padding(d):  # same size, but the zeros after the end-of-archive marker are not
    xor_at(d / T0, (d / T0).stat().st_size - 100)


def not_a_tar(d):
    (d / T1).write_bytes(bytes(range(256)) * 81)


def huge_member_size(d):
    """The last header claims an 8 GiB member (checksum fixed): nothing may read that much."""
    m = member_at(d / V0, 1, "json")
    data = bytearray((d / V0).read_bytes())
    h = m.offset - 512
    data[h + 124 : h + 136] = b"77777777777\0"
    data[h + 148 : h + 156] = b"        "
    data[h + 148 : h + 156] = b"%06o\0 " % sum(data[h : h + 512])
    (d / V0).write_bytes(bytes(data))


def other_render_hash(d):
    m = member_at(d / T1, 0, "json")
    raw = (d / T1).read_bytes()[m.offset : m.offset + m.size]
    rh = json.loads(raw)["render_hash"].encode()
    with open(d / T1, "r+b") as f:  # same length, in place: only the render hash differs
        f.seek(m.offset + raw.index(b'"render_hash":"' + rh) + len(b'"render_hash":"'))
        f.write(b"0" * len(rh))


def swap_clips(d):
    def change(items):
        items["00000000.mp4"], items["00000001.mp4"] = items["00000001.mp4"], items["00000000.mp4"]
        return items

    rewrite(d / T0, change)


def swap_metadata(d):
    def change(items):
        a, b = items["00000002.json"], items["00000003.json"]
        items["00000002.json"], items["00000003.json"] = b, a
        return items

    rewrite(d / T1, change)


def drop_frame(d):
    rewrite(d / T1, lambda items: reencode(items, "00000003", d, lambda f: f[:-1]))


def wrong_frame_size(d):
    rewrite(d / V0, lambda items: reencode(items, "00000000", d, lambda f: f[:, ::2, ::2]))


def corrupt_coded_frame_with_fixed_checksum(d):
    def change(items):
        clip = bytearray(items["00000001.mp4"])
        for k in range(len(clip) // 2, len(clip) // 2 + 4):
            clip[k] ^= 0xFF  # inside a coded FFV1 slice: its CRC fails
        items["00000001.mp4"] = bytes(clip)
        return set_meta(items, "00000001", clip_sha256=clip_checksum(bytes(clip)))

    rewrite(d / V0, change)


def duplicate_key(d):
    def change(items):
        out = {}
        for name, data in items.items():
            out[name.replace("00000002", "00000000")] = data
        return set_meta(out, "00000000", key="00000000")

    rewrite(d / T1, change)


def wrong_split(d):
    rewrite(d / V0, lambda items: set_meta(items, "00000001", split="train"))


def wrong_key(d):
    rewrite(d / T1, lambda items: set_meta(items, "00000003", key="00000009"))


def key_with_a_newline(d):  # a member name from the data cannot forge a line of the report
    rewrite(
        d / T0, lambda items: {k.replace("00000001", "0000\n0001"): v for k, v in items.items()}
    )


def missing_json(d):
    rewrite(d / T0, lambda items: {k: v for k, v in items.items() if k != "00000001.json"})


def manifest_sha256(d):
    m = json.loads((d / "manifest.json").read_text())
    m["splits"]["val"]["shards"][0]["sha256"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(m))


def manifest_count(d):  # consistent totals, one sample more than the shard holds
    m = json.loads((d / "manifest.json").read_text())
    s = m["splits"]["train"]
    s["shards"][1]["samples"] += 1
    s["shards"][1]["frames"] += 4
    s["samples"] += 1
    s["inputs"] += 1
    s["frames"] += 4
    s["tasks"]["add"] += 1
    (d / "manifest.json").write_text(json.dumps(m))


# name -> (corrupt, exact summary counts, [(shard, key, reason, detail fragment)])
CASES = {
    "flip_clip": (
        flip_clip,
        {"sha256": 1, "clip checksum": 1},
        [(T0, "00000001", "clip checksum", "clip checksum mismatch"), (T0, "", "sha256", "")],
    ),
    "flip_json": (
        flip_json,
        {"sha256": 1, "bad metadata": 1},
        [(T0, "00000001", "bad metadata", "metadata is not JSON")],
    ),
    "cut_at_header": (
        cut_at_header,
        {"size": 1, "sha256": 1, "end of archive": 1, "sample count": 1},
        [
            (T0, "", "size", "6144 bytes, the manifest says 20480"),
            (T0, "", "end of archive", "no end-of-archive marker"),
            (T0, "", "sample count", "1 complete sample(s), the manifest says 2"),
        ],
    ),
    "cut_mid_member": (
        cut_mid_member,
        {"size": 1, "sha256": 1, "corrupt tar": 1, "truncated member": 1, "sample count": 1},
        [
            (T0, "", "corrupt tar", "unexpected end of data"),
            (T0, "00000001", "truncated member", "00000001.mp4 holds 100 of its"),
            (T0, "", "sample count", "1 complete sample(s), the manifest says 2"),
        ],
    ),
    "delete_shard": (delete_shard, {"missing shard": 1}, [(T1, "", "missing shard", "")]),
    "append_garbage": (
        append_garbage,
        {"size": 1, "sha256": 1, "end of archive": 1},
        [(T0, "", "end of archive", "not all zero")],
    ),
    "scribble_in_padding": (
        scribble_in_padding,
        {"sha256": 1, "end of archive": 1},
        [(T0, "", "end of archive", "data at byte 20380")],
    ),
    "not_a_tar": (
        not_a_tar,
        {"size": 1, "sha256": 1, "corrupt tar": 1, "sample count": 1},
        [(T1, "", "corrupt tar", ""), (T1, "", "sample count", "0 complete sample(s)")],
    ),
    "huge_member_size": (
        huge_member_size,
        {"sha256": 1, "corrupt tar": 1, "truncated member": 1, "sample count": 1},
        [(V0, "00000001", "truncated member", "of its 8589934591 bytes")],
    ),
    "other_render_hash": (
        other_render_hash,
        {"sha256": 1, "render hash": 1},
        [(T1, "00000002", "render hash", "rendered with hash 0000000000000000")],
    ),
    "swap_clips": (
        swap_clips,
        {"sha256": 1, "clip checksum": 2},
        [(T0, "00000000", "clip checksum", ""), (T0, "00000001", "clip checksum", "")],
    ),
    "swap_metadata": (
        swap_metadata,
        {"sha256": 1, "clip checksum": 2},
        [(T1, "00000002", "clip checksum", ""), (T1, "00000003", "clip checksum", "")],
    ),
    "drop_frame": (
        drop_frame,
        {"sha256": 1, "frame count": 1},
        [(T1, "00000003", "frame count", "decoded 3 frames, metadata says 4")],
    ),
    "wrong_frame_size": (
        wrong_frame_size,
        {"size": 1, "sha256": 1, "frame size": 1},  # a quarter of the pixels: a smaller shard
        [(V0, "00000000", "frame size", "frame size (32, 32), dataset renders (64, 64)")],
    ),
    "corrupt_coded_frame": (
        corrupt_coded_frame_with_fixed_checksum,
        {"sha256": 1, "decode": 1},
        [(V0, "00000001", "decode", "decoder errors (slice CRC mismatch")],
    ),
    "duplicate_key": (
        duplicate_key,
        {"sha256": 1, "duplicate key": 1},
        [(T1, "00000000", "duplicate key", f"also in {T0} (split train)")],
    ),
    "wrong_split": (
        wrong_split,
        {"sha256": 1, "split": 1},
        [(V0, "00000001", "split", "KEY.json says split 'train', it is in 'val'")],
    ),
    "wrong_key": (
        wrong_key,
        {"sha256": 1, "key": 1},
        [(T1, "00000003", "key", "KEY.json says key '00000009'")],
    ),
    "key_with_a_newline": (
        key_with_a_newline,
        {"sha256": 1, "key": 1},
        [(T0, repr("0000\n0001"), "key", "KEY.json says key '00000001'")],
    ),
    "missing_json": (
        missing_json,
        {"sha256": 1, "missing member": 1},
        [(T0, "00000001", "missing member", "has ['mp4'], needs mp4 and json")],
    ),
    "manifest_sha256": (
        manifest_sha256,
        {"sha256": 1},
        [(V0, "", "sha256", "the manifest says 0000000000000000")],
    ),
    "manifest_count": (
        manifest_count,
        {"sample count": 1},
        [(T1, "", "sample count", "2 complete sample(s), the manifest says 3")],
    ),
}


def test_clean_dataset_verifies(d, capsys):
    rc, out, counts = run(d, capsys)
    assert rc == 0 and counts == {}
    assert out.splitlines() == ["verified 3 shard(s), 6 sample(s)", "no problems found"]


@pytest.mark.parametrize("name", CASES)
def test_hostile_dataset(d, capsys, name):
    corrupt, want_counts, want_lines = CASES[name]
    corrupt(d)
    rc, out, counts = run(d, capsys)
    assert rc == 1, out
    assert counts == want_counts, out
    assert f"{sum(want_counts.values())} problem(s):" in out
    lines = out.splitlines()
    for shard, key, reason, detail in want_lines:
        head = f"{shard} {key}: {reason}: " if key else f"{shard}: {reason}: "
        assert any(line.startswith(head) and detail in line for line in lines), (head, out)
    # every problem is listed once (under the cap), and only under a known reason
    listed = [ln for ln in lines if re.match(r"\S+\.tar( \S+)?: ", ln)]
    assert len(listed) == sum(want_counts.values()), out
    assert set(counts) <= set(REASONS)


def test_problems_are_all_counted_but_the_listing_is_capped(d, capsys):
    for shard in (T0, T1, V0):
        for sample in (0, 1):
            m = member_at(d / shard, sample, "mp4")
            xor_at(d / shard, m.offset + m.size // 2, 8)
    rc, out, counts = run(d, capsys, "--max-lines", "4")
    assert rc == 1 and counts == {"sha256": 3, "clip checksum": 6}
    assert len([ln for ln in out.splitlines() if ".tar" in ln]) == 4
    assert "... and 5 more" in out and "9 problem(s):" in out


def test_bad_manifest_is_a_problem_and_the_shards_are_still_verified(d, capsys):
    m = json.loads((d / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["samples"] = "2"
    (d / "manifest.json").write_text(json.dumps(m))
    flip_clip(d)
    rc, out, counts = run(d, capsys)
    assert rc == 1 and counts == {"bad manifest": 1, "clip checksum": 1}
    assert "splits.train.shards[0].samples: str '2' is not a count" in out
    assert f"{d / T0} 00000001: clip checksum: " in out  # checked as a lone tar: its own path
    assert "verified 3 shard(s), 6 sample(s)" in out


def test_lone_tar_without_manifest(d, tmp_path, capsys):
    lone = tmp_path / "lone" / "x.tar"
    lone.parent.mkdir()
    shutil.copy(d / T1, lone)
    rc, out, counts = run(lone, capsys)
    assert rc == 0 and "verified 1 shard(s), 2 sample(s)" in out
    m = member_at(lone, 0, "mp4")
    xor_at(lone, m.offset + 40, 8)
    with open(lone, "ab") as f:
        f.write(b"x")
    rc, out, counts = run(lone, capsys)
    assert rc == 1 and counts == {"clip checksum": 1, "end of archive": 1}
    assert f"{lone} 00000002: clip checksum: " in out


def test_a_shard_of_a_dataset_is_checked_against_its_manifest_entry(d, capsys):
    append_garbage(d)
    rc, out, counts = run(d / T0, capsys)
    assert rc == 1 and counts == {"size": 1, "sha256": 1, "end of archive": 1}
    assert "verified 1 shard(s), 2 sample(s)" in out


def test_progress_bar_has_a_total(d, capsys):
    verify(d, progress=True)
    err = capsys.readouterr().err
    assert "verify" in err and "6/6" in err


def test_paths_that_hold_no_shards_exit_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing"), "--verify"]) == 2
    (tmp_path / "x.txt").write_text("x")
    assert main(["inspect", str(tmp_path / "x.txt"), "--verify"]) == 2
    assert main(["inspect", str(tmp_path), "--verify"]) == 2
    assert "no manifest.json and no shard-*.tar" in capsys.readouterr().err


# -- plain `evav inspect`: same output, plus warnings; never a crash ---------------------------
@pytest.mark.parametrize(
    "corrupt, warning",
    [
        (cut_at_header, "5 complete samples found, the manifest says 6; 1 shard(s) differ"),
        (cut_mid_member, "1 shard(s) unreadable to the end"),
        (delete_shard, "1 shard(s) missing"),
        (flip_json, f"1 sample(s) with unreadable metadata, e.g. {T0}"),
        (not_a_tar, "4 complete samples found, the manifest says 6"),
    ],
)
def test_plain_inspect_warns_and_never_crashes(d, capsys, corrupt, warning):
    corrupt(d)
    capsys.readouterr()
    assert main(["inspect", str(d)]) == 0
    out = capsys.readouterr().out
    assert "samples per split and task" in out and "frames per clip: count" in out
    assert any(ln.startswith("warning: ") and warning in ln for ln in out.splitlines()), out


def test_plain_inspect_of_a_clean_dataset_has_no_warning(d, capsys):
    capsys.readouterr()
    assert main(["inspect", str(d)]) == 0
    out = capsys.readouterr().out
    assert "warning" not in out and "train    add" in out


def test_examples_of_a_corrupt_clip_are_an_error_not_a_crash(d, tmp_path, capsys):
    for shard in (T0, T1, V0):
        for sample in (0, 1):
            m = member_at(d / shard, sample, "mp4")
            xor_at(d / shard, m.offset + m.size // 2, 8)
    assert main(["inspect", str(d), "--out", str(tmp_path / "s.png")]) == 2
    assert "clip checksum mismatch" in capsys.readouterr().err


def test_inspect_shows_each_tasks_answer_distribution_and_majority_baseline(d, capsys):
    """The answers counted from every KEY.json (read here with tarfile, not by evav), the
    majority answer's share (the baseline a model must beat) and chance, per split and task."""
    from collections import Counter

    from preprocessing.inspect import inspect

    want: dict[tuple[str, str], Counter] = {}
    for shard in sorted(d.rglob("*.tar")):
        for name, data in members(shard):
            if name.endswith(".json"):
                meta = json.loads(data)
                want.setdefault((meta["split"], meta["task"]), Counter())[meta["answer"]] += 1
    report = inspect(d)
    assert report.answers == want
    capsys.readouterr()
    assert main(["inspect", str(d)]) == 0
    out = capsys.readouterr().out
    for (split, task), got in want.items():
        line = next(ln for ln in out.splitlines() if re.match(rf"  {split}\s+{task}\s+\d", ln))
        n = sum(got.values())
        if any(got):
            top, k = got.most_common(1)[0]
            assert f"{len(got)} answers, majority {top!r} {k / n:.1%}" in line, line
            assert f"chance {1 / len(got):.1%}" in line, line
        else:
            assert "no answer text" in line, line
