"""Bad inputs are quarantined with their reasons and the build goes on; bad layouts stop early.

Each raw folder mixes real files from ../shared/datasets with broken ones: a zero-byte wav, a
truncated wav, a mislabelled wav name, a truncated mp4, a zero-byte mp4, a garbage jpg, TSV rows
with a missing field and a bad label. Exactly those are quarantined; everything else is built,
and inputs = samples + quarantined.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from evav.cli import main
from evav.manifest import Manifest, load_manifest


def build(builder: str, src: Path, out: Path, *extra: str) -> Manifest:
    assert main(["preprocess", builder, "--src", str(src), "--out", str(out), *extra]) == 0
    return load_manifest(out)


def quarantined(m: Manifest) -> dict[str, str]:
    return {
        Path(q.source.split(":")[0]).name
        + (":" + q.source.split(":")[1] if ":" in q.source else ""): q.reason
        for q in m.quarantined
    }


def test_fsdd_zero_byte_truncated_and_mislabelled_wavs(datasets, tmp_path):
    rec = tmp_path / "raw" / "recordings"
    rec.mkdir(parents=True)
    good = sorted((datasets / "fsdd" / "recordings").glob("*_jackson_1*.wav"))[:6]
    for f in good:
        shutil.copy(f, rec / f.name)
    (rec / "3_jackson_7.wav").write_bytes(b"")
    data = good[0].read_bytes()
    (rec / "4_jackson_8.wav").write_bytes(data[: len(data) // 2])
    shutil.copy(good[1], rec / "x_jackson_9.wav")
    m = build("fsdd", tmp_path / "raw", tmp_path / "out")
    q = quarantined(m)
    assert set(q) == {"3_jackson_7.wav", "4_jackson_8.wav", "x_jackson_9.wav"}
    assert "empty file" in q["3_jackson_7.wav"]
    assert "truncated" in q["4_jackson_8.wav"]
    assert "name is not" in q["x_jackson_9.wav"]
    assert m.num_samples == len(good)
    assert sum(s.inputs for s in m.splits.values()) == len(good) + 3


def test_video_truncated_and_zero_byte_mp4(datasets, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("brink_20_256.mp4", "cherries_30_320x180.mp4"):
        shutil.copy(datasets / "videos" / name, raw / name)
    data = (datasets / "videos" / "palmtrees_loop_256.mp4").read_bytes()
    (raw / "cut.mp4").write_bytes(data[: len(data) // 3])
    (raw / "empty.mp4").write_bytes(b"")
    m = build("video", raw, tmp_path / "out", "num_frames=4")
    q = quarantined(m)
    assert set(q) == {"cut.mp4", "empty.mp4"}
    assert "empty file" in q["empty.mp4"]
    assert m.num_samples == 2


def test_cifar10_garbage_jpg(datasets, tmp_path):
    for cls in ("cat", "dog"):
        d = tmp_path / "raw" / "test" / cls
        d.mkdir(parents=True)
        for f in sorted((datasets / "cifar10" / "test" / cls).glob("*.jpg"))[:3]:
            shutil.copy(f, d / f.name)
    (tmp_path / "raw" / "test" / "dog" / "garbage.jpg").write_bytes(
        b"\xff\xd8\xff\xe0 not really a jpeg" * 20
    )
    m = build("cifar10", tmp_path / "raw", tmp_path / "out")
    q = quarantined(m)
    assert list(q) == ["garbage.jpg"] and "image" in q["garbage.jpg"]
    assert m.splits["test"].samples == 6 and m.splits["test"].tasks == {"cifar10": 6}


def test_sst2_tsv_with_broken_rows(datasets, tmp_path):
    rows = (datasets / "sst2" / "dev.tsv").read_text().splitlines()[:11]
    rows.insert(3, "a row without a label")
    rows.insert(6, "a row with a bad label\t7")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "dev.tsv").write_text("\n".join(rows) + "\n")
    m = build("sst2", tmp_path / "raw", tmp_path / "out")
    q = quarantined(m)
    assert q == {
        "dev.tsv:4": "broken row: 1 tab-separated fields, expected 2",
        "dev.tsv:7": "label '7' is not 0 or 1",
    }
    assert m.splits["val"].samples == 10 and m.splits["val"].inputs == 12


def test_sst2_balance_alternates_the_labels_so_any_limit_is_half_of_each(tmp_path):
    """balance=true: negative and positive training rows alternately, each label in file order,
    the commoner label's surplus dropped; --limit then keeps a balanced prefix. A row with an
    unreadable label is still listed and quarantined."""
    from tests.test_preprocess import read_samples

    rows = ["sentence\tlabel"] + [f"good film number {i}\t1" for i in range(7)]
    rows[3:3] = ["dull film\t0", "bad film\t0", "a broken row", "weak film\t0"]
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "train.tsv").write_text("\n".join(rows) + "\n")

    def texts(out):
        return sorted(meta.extra["text"] for meta, _ in read_samples(out).values())

    m = build("sst2", tmp_path / "raw", tmp_path / "out", "balance=true")
    assert quarantined(m) == {"train.tsv:6": "broken row: 1 tab-separated fields, expected 2"}
    assert m.splits["train"].samples == 6 and m.splits["train"].inputs == 7
    assert texts(tmp_path / "out") == sorted(
        ["bad film", "dull film", "weak film"] + [f"good film number {i}" for i in range(3)]
    )
    # --limit 5 is stratified by label: 2 of each, and the broken row (a group of its own:
    # 1/7 of 5 rounds up)
    m = build("sst2", tmp_path / "raw", tmp_path / "lim", "balance=true", "--limit", "5")
    assert m.splits["train"].samples == 4 and len(m.quarantined) == 1
    kept = texts(tmp_path / "lim")
    assert sum(t.startswith("good") for t in kept) == 2
    plain = build("sst2", tmp_path / "raw", tmp_path / "plain")
    assert plain.splits["train"].samples == 10


@pytest.mark.parametrize(
    "builder, layout, expected",
    [
        ("fsdd", {}, "expected the FSDD layout recordings/"),
        (
            "sst2",
            {"dev.tsv": "text\tlabel\nhello\t1\n"},
            "expected the header 'sentence<TAB>label'",
        ),
        ("cifar10", {"test/notaclass/a.png": ""}, "are not CIFAR-10 classes"),
        ("audiomnist", {"readme.txt": ""}, "expected the AudioMNIST layout"),
        ("clevrer", {"video_00001.mp4": ""}, "expected CLEVRER question files"),
        ("lasot", {"cat/cat-1/groundtruth.txt": ""}, "expected LaSOT sequences"),
        ("tinyvirat", {"tiny_train.json": '{"tubes": 3}'}, "expected a list of tubes"),
        ("moving_mnist", {"t10k-images-idx3-ubyte": "garbage"}, "not an idx3 image file"),
        ("video", {"notes.txt": "x"}, "expected video files"),
    ],
)
def test_malformed_sources_stop_early_saying_what_was_expected(
    tmp_path, capsys, builder, layout, expected
):
    raw = tmp_path / "raw"
    raw.mkdir()
    for rel, text in layout.items():
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        (raw / rel).write_text(text)
    assert main(["preprocess", builder, "--src", str(raw), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert expected in err and not (tmp_path / "out" / "manifest.json").exists()


def test_missing_src_is_a_clear_error(tmp_path, capsys):
    assert (
        main(["preprocess", "fsdd", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["preprocess", "fsdd", "--out", str(tmp_path / "o")]) == 2
    assert "needs --src" in capsys.readouterr().err
