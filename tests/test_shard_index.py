"""Per-shard indexes (evav.data.shards): written beside each shard at build time by webdataset's
TarWriter path, listed in the manifest, read once per loader process; shards built before them
still read (headers walked, one warning); a forged, stale or hostile index is refused cleanly
(headers walked instead), never a crash, a hang, a read outside the file or a huge allocation.

Every case works on a copy of one tiny synthetic build (2 samples per shard).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
from pathlib import Path

import pytest

import evav.data.shards as shards_mod
from evav.data import DataConfig, Loader
from evav.data.shards import (
    ShardReader,
    encode_index,
    index_path,
    index_shard,
    load_index,
    parse_index,
)
from evav.manifest import load_manifest
from preprocessing.runner import BuildConfig, build
from preprocessing.shards import ShardWriter
from tests.test_inspect import members as tar_members
from tests.test_inspect import write_tar

OPTIONS = {"tasks": ["add", "count"], "train_per_task": 3, "val_per_task": 1}


def make(out: Path, seed: int = 0) -> Path:
    build(BuildConfig("synthetic", str(out), options=OPTIONS, shard_samples=2, seed=seed))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return make(tmp_path_factory.mktemp("index") / "d")


@pytest.fixture
def d(built, tmp_path) -> Path:
    dst = tmp_path / "d"
    shutil.copytree(built, dst)
    return dst


def all_shards(d: Path):
    m = load_manifest(d)
    return [(split, sh) for split, s in sorted(m.splits.items()) for sh in s.shards]


def epoch_keys(d: Path, num_workers: int = 0) -> tuple[list[str], dict]:
    ld = Loader(DataConfig(train=[str(d)], num_workers=num_workers), batch_size=4, infinite=False)
    got = [k for b in ld for k in b["key"]]
    return got, ld.stats()


def set_index(d: Path, shard_rel: str, data: bytes, fix_manifest: bool = True) -> Path:
    """Replace a shard's index file by ``data`` (and, by default, its sha256 in the manifest, so
    the index's own checks are what refuse it)."""
    path = index_path(d / shard_rel)
    path.write_bytes(data)
    if fix_manifest:
        m = json.loads((d / "manifest.json").read_text())
        for s in m["splits"].values():
            for sh in s["shards"]:
                if sh["path"] == shard_rel:
                    sh["index_sha256"] = hashlib.sha256(data).hexdigest()
        (d / "manifest.json").write_text(json.dumps(m))
    return path


def index_doc(d: Path, shard_rel: str) -> dict:
    return json.loads(index_path(d / shard_rel).read_bytes())


def n_samples(d: Path, split: str = "train") -> int:
    return load_manifest(d).splits[split].samples


# -- build side ------------------------------------------------------------------------------
def test_every_shard_has_an_index_listed_in_the_manifest(built):
    m = load_manifest(built)
    assert m.format_version == 3
    for _, sh in all_shards(built):
        assert sh.index == sh.path + ".idx.json"
        data = (built / sh.index).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sh.index_sha256
        doc = json.loads(data)
        assert doc["bytes"] == sh.bytes and doc["sha256"] == sh.sha256
        assert len(doc["samples"]) == sh.samples
    names = {p.name for p in (built / "train").iterdir()}
    assert not [n for n in names if n.startswith(".")]  # no temporary file left behind


def test_index_offsets_read_back_the_same_bytes_as_tarfile(built):
    for _, sh in all_shards(built):
        shard = built / sh.path
        idx, why = load_index(shard, built / sh.index, sh.index_sha256, sh.sha256)
        assert idx is not None, why
        assert idx.from_file
        walked = index_shard(shard)
        assert (idx.keys, idx.members) == (walked.keys, walked.members)
        want = dict(tar_members(shard))
        raw = shard.read_bytes()
        for key, members in zip(idx.keys, idx.members):
            assert set(members) == {"json", "mp4"}
            for ext, m in members.items():
                assert raw[m.offset : m.offset + m.size] == want[f"{key}.{ext}"]
        reader = ShardReader()
        for i, key in enumerate(idx.keys):
            got_key, got = reader.read(str(shard), i)
            assert got_key == key
            assert got == {ext: want[f"{key}.{ext}"] for ext in ("json", "mp4")}
        assert reader.index(str(shard)).from_file
        reader.close()


def test_shards_and_indexes_are_byte_identical_across_builds(built, tmp_path):
    other = make(tmp_path / "again")
    for _, sh in all_shards(built):
        assert (other / sh.path).read_bytes() == (built / sh.path).read_bytes()
        assert (other / sh.index).read_bytes() == (built / sh.index).read_bytes()
    assert load_manifest(other).to_dict()["splits"] == load_manifest(built).to_dict()["splits"]


def test_headers_are_fixed_metadata(built):
    _, sh = all_shards(built)[0]
    with tarfile.open(built / sh.path) as tar:
        for info in tar.getmembers():
            assert (info.mtime, info.mode, info.uid, info.gid) == (0, 0o644, 0, 0)
            assert (info.uname, info.gname) == ("", "")


def test_plain_webdataset_reads_every_shard(built):
    import webdataset as wds

    m = load_manifest(built)
    for s in m.splits.values():
        urls = [str(built / sh.path) for sh in s.shards]
        got = list(wds.WebDataset(urls, shardshuffle=False))
        assert len(got) == s.samples
        assert all(set(x) >= {"__key__", "json", "mp4"} for x in got)
        keys = [k for sh in s.shards for k in index_doc(built, sh.path)["samples"]]
        assert [x["__key__"] for x in got] == [k for k, _ in keys]


def test_wids_reads_every_split_from_its_descriptor(built, tmp_path):
    """webdataset's indexed reader opens each split from the build's ``wids-SPLIT.json``: as
    many samples as the manifest says, in shard order, each with its json and mp4 bytes."""
    import wids

    m = load_manifest(built)
    for split, s in sorted(m.splits.items()):
        desc = json.loads((built / f"wids-{split}.json").read_text())
        assert desc["__kind__"] == "wids-shard-index-v1"
        assert [(x["url"], x["nsamples"]) for x in desc["shardlist"]] == [
            (sh.path, sh.samples) for sh in s.shards
        ]
        ds = wids.ShardListDataset(
            str(built / f"wids-{split}.json"), cache_dir=str(tmp_path / split), transformations=[]
        )
        assert len(ds) == s.samples
        keys = [k for sh in s.shards for k, _ in index_doc(built, sh.path)["samples"]]
        got = [ds[i] for i in range(len(ds))]
        assert [x["__key__"] for x in got] == keys
        for x in got:
            meta = json.loads(x[".json"].read())
            assert meta["num_frames"] > 0 and x[".mp4"].read()[4:8] == b"ftyp"


def test_writer_leaves_nothing_when_the_block_raises(tmp_path):
    final = tmp_path / "s" / "shard-000000.tar"
    with pytest.raises(RuntimeError), ShardWriter(final, "t") as w:
        w.add("00000000", {"json": b"{}", "mp4": b"x" * 700})
        raise RuntimeError("boom")
    assert list((tmp_path / "s").iterdir()) == []


def test_writer_refuses_keys_webdataset_would_split_otherwise(tmp_path):
    with pytest.raises(ValueError, match="webdataset"), ShardWriter(tmp_path / "x.tar", "t") as w:
        w.add("a.b", {"json": b"{}"})
    assert not (tmp_path / "x.tar").exists() and not index_path(tmp_path / "x.tar").exists()


# -- reading ---------------------------------------------------------------------------------
def test_the_loader_reads_index_files_and_never_walks_tar_headers(d, monkeypatch):
    ld = Loader(DataConfig(train=[str(d)]), batch_size=4, infinite=False)
    paths = {str(d / sh.path) for split, sh in all_shards(d) if split == "train"}
    assert set(ld.catalog.listed) == paths  # the manifest's listing
    assert set(ld.catalog.indexes) == paths  # every index read once, from its file
    assert all(idx.from_file for idx in ld.catalog.indexes.values())

    def no_io(*a, **k):
        raise AssertionError("tar headers walked")

    # forked DataLoader workers inherit this: a header walk there is a skipped sample
    monkeypatch.setattr(shards_mod, "index_shard", no_io)
    for num_workers in (0, 2):
        ld.cfg.num_workers = num_workers
        got = [k for b in ld.iterate() for k in b["key"]]
        assert len(got) == n_samples(d) and len(set(got)) == len(got)
        assert ld.stats()["data/skipped"] == 0
        ld.reset()


def downgrade(d: Path) -> None:
    """Make ``d`` a dataset built before indexes: version 2 manifest, no index files."""
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 2
    for s in m["splits"].values():
        for sh in s["shards"]:
            index_path(d / sh["path"]).unlink()
            del sh["index"], sh["index_sha256"]
    (d / "manifest.json").write_text(json.dumps(m))


def test_old_shards_without_index_still_read_with_one_warning_each(d, caplog):
    want, _ = epoch_keys(d)
    downgrade(d)
    assert load_manifest(d).format_version == 2
    with caplog.at_level(logging.WARNING, logger="evav.data.shards"):
        got, stats = epoch_keys(d)
    assert got == want and stats["data/skipped"] == 0
    msgs = [r.getMessage() for r in caplog.records if "built before indexes" in r.getMessage()]
    for split, sh in all_shards(d):
        if split == "train":
            assert sum(str(d / sh.path) in msg for msg in msgs) == 1, msgs
    assert all("rebuild with evav preprocess" in msg for msg in msgs)
    reader = ShardReader()  # used alone, too
    _, sh = all_shards(d)[0]
    assert reader.read(str(d / sh.path), 0)[1] == {
        n.split(".")[1]: b for n, b in tar_members(d / sh.path)[:2]
    }


def forged(edit):
    """An index edit: ``edit(doc)`` changes the parsed index in place (or returns raw bytes)."""

    def make_bytes(doc: dict) -> bytes:
        out = edit(doc)
        return out if isinstance(out, bytes) else json.dumps(doc).encode()

    return make_bytes


def _first(doc):
    return doc["samples"][0][1]


FORGED = {
    "not-json": (forged(lambda doc: b"\x00\xffnot json{"), "not JSON"),
    "not-an-object": (forged(lambda doc: b"[1, 2, 3]"), "not an evav-shard-index"),
    "deep-nesting": (forged(lambda doc: b"[" * 100_000 + b"]" * 100_000), "not"),
    "other-version": (forged(lambda doc: doc.update(version=99)), "version 99"),
    "offset-past-the-end": (
        forged(lambda doc: _first(doc)["mp4"].__setitem__(0, doc["bytes"] + 512)),
        "outside",
    ),
    "huge-size": (forged(lambda doc: _first(doc)["mp4"].__setitem__(1, 2**62)), "outside"),
    "negative-offset": (forged(lambda doc: _first(doc)["json"].__setitem__(0, -512)), "outside"),
    "unaligned-offset": (forged(lambda doc: _first(doc)["json"].__setitem__(0, 700)), "outside"),
    "offset-a-bool": (
        forged(lambda doc: _first(doc).__setitem__("json", [True, 3])),
        "not [offset, size]",
    ),
    "too-many-samples": (
        forged(lambda doc: doc.update(samples=doc["samples"] * 10_000)),
        "longer than the shard",
    ),
    "wrong-shard-size": (forged(lambda doc: doc.update(bytes=doc["bytes"] + 10240)), "bytes"),
    "shard-sha-of-another": (
        forged(lambda doc: doc.update(sha256="0" * 64)),
        "sha256 differs from the manifest",
    ),
    # in bounds and well formed, but pointing one block off: caught by the header check
    "offsets-shifted": (
        forged(
            lambda doc: [
                m.__setitem__(0, m[0] + 512) for _, ms in doc["samples"] for m in ms.values()
            ]
        ),
        "stale",
    ),
    # the two samples' entries swapped: every offset is a real member, the wrong one
    "samples-swapped": (forged(lambda doc: doc["samples"].reverse()), "not in file order"),
}


@pytest.mark.parametrize("name", sorted(FORGED))
def test_forged_index_is_refused_and_the_headers_read_instead(d, name, caplog):
    want, _ = epoch_keys(d)
    make_bytes, reason = FORGED[name]
    rel = load_manifest(d).splits["train"].shards[1].path
    set_index(d, rel, make_bytes(index_doc(d, rel)))
    with caplog.at_level(logging.WARNING, logger="evav.data.shards"):
        got, stats = epoch_keys(d)
    assert got == want and stats["data/skipped"] == 0
    msgs = [r.getMessage() for r in caplog.records if str(d / rel) in r.getMessage()]
    assert len(msgs) == 1 and reason in msgs[0], msgs
    assert "tar headers" in msgs[0] and "rebuild" not in msgs[0]


def test_index_whose_sha_differs_from_the_manifest_is_refused(d, caplog):
    rel = load_manifest(d).splits["train"].shards[0].path
    doc = index_doc(d, rel)
    set_index(d, rel, json.dumps(doc, indent=2).encode(), fix_manifest=False)  # same content
    idx, why = load_index(
        d / rel, index_sha256=load_manifest(d).splits["train"].shards[0].index_sha256
    )
    assert idx is None and "sha256 differs" in why
    with caplog.at_level(logging.WARNING, logger="evav.data.shards"):
        got, stats = epoch_keys(d)
    assert len(got) == n_samples(d) and stats["data/skipped"] == 0
    assert any("sha256 differs" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind", ["fifo", "directory", "oversized"])
def test_hostile_index_file_is_refused_without_hanging(d, kind, monkeypatch):
    rel = load_manifest(d).splits["train"].shards[0].path
    ipath = index_path(d / rel)
    ipath.unlink()
    if kind == "fifo":
        os.mkfifo(ipath)  # opened blocking, this would hang the reader
    elif kind == "directory":
        ipath.mkdir()
    else:
        ipath.write_bytes(b" " * 4096)
        monkeypatch.setattr(shards_mod, "MAX_INDEX_BYTES", 1024)
    idx, why = load_index(d / rel)
    assert idx is None and (("limit" in why) if kind == "oversized" else "unreadable" in why)
    got, stats = epoch_keys(d)
    assert len(got) == n_samples(d) and stats["data/skipped"] == 0


def test_stale_index_of_a_replaced_shard_is_detected(d, caplog):
    """The shard rewritten after its index (same size, samples in the other order): the first
    read checks the member's header, finds another member and walks the headers instead."""
    rel = load_manifest(d).splits["train"].shards[0].path
    shard = d / rel
    items = tar_members(shard)
    swapped = items[2:] + items[:2]
    size = shard.stat().st_size
    write_tar(shard, swapped)
    assert shard.stat().st_size == size  # the index's size check alone cannot tell
    idx, why = load_index(shard)
    assert idx is not None  # it looks valid
    reader = ShardReader()
    with caplog.at_level(logging.WARNING, logger="evav.data.shards"):
        key, got = reader.read(str(shard), 0)
    assert key == swapped[0][0].split(".")[0]
    assert got == {n.split(".")[1]: b for n, b in swapped[:2]}
    assert any("stale" in r.getMessage() and str(shard) in r.getMessage() for r in caplog.records)
    assert not reader.index(str(shard)).from_file


def test_shard_grown_after_its_index_was_loaded_is_detected(d):
    """A loader's index, loaded at start, checked against the shard's size at every read."""
    rel = load_manifest(d).splits["train"].shards[0].path
    shard = d / rel
    reader = ShardReader()
    reader.index(str(shard))
    items = tar_members(shard)
    write_tar(shard, [(items[0][0], items[0][1] + b" " * 20000), *items[1:]])
    key, got = reader.read(str(shard), 0)
    assert got["json"] == items[0][1] + b" " * 20000


def test_shard_cut_short_with_a_valid_index_counts_the_lost_samples(d):
    rel = load_manifest(d).splits["train"].shards[1].path
    idx, _ = load_index(d / rel)
    with open(d / rel, "r+b") as f:  # cut inside the second sample's clip
        f.truncate(idx.members[1]["mp4"].offset + 100)
    got, stats = epoch_keys(d)
    assert len(got) == n_samples(d) - 1 and stats["data/skipped"] == 1


def test_parse_index_round_trips():
    samples = [("00000000", {"json": (512, 10), "mp4": (1536, 600)})]
    data = encode_index("shard-000000.tar", 10240, "a" * 64, samples)
    idx = parse_index(data, "s.tar", 10240, "a" * 64)
    assert idx.keys == ["00000000"] and idx.members[0]["mp4"].offset == 1536
    with pytest.raises(ValueError, match="another shard"):
        parse_index(data, "s.tar", 10240, "b" * 64)


# -- manifest --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda sh: sh.update(index="../../etc/passwd"), "index"),
        (lambda sh: sh.update(index="pipe:cat x"), "index"),
        (lambda sh: sh.update(index=3), "index"),
        (lambda sh: sh.pop("index_sha256"), "index"),
        (lambda sh: sh.update(index_sha256="XYZ"), "index_sha256"),
    ],
)
def test_manifest_checks_the_index_fields(d, edit, field):
    m = json.loads((d / "manifest.json").read_text())
    edit(m["splits"]["train"]["shards"][0])
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=rf"splits\.train\.shards\[0\]\.{field}"):
        load_manifest(d)
