"""Manifest validation: a manifest.json of valid JSON but wrong types, impossible counts or unsafe
paths is a ValueError naming the file and the field path, never a crash deeper in a reader.

Every case starts from a real manifest (preprocessing.runner.build, synthetic, tiny) and breaks
one thing; the untouched manifest must pass, and so must a consistent edit (a quarantined input).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest

import evav.manifest
from evav.data.loader import DataConfig, Loader
from evav.manifest import MIN_SAMPLE_BYTES, Manifest, load_manifest
from preprocessing.runner import BuildConfig, build


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("manifest") / "d"
    build(
        BuildConfig(
            "synthetic",
            str(out),
            options={"tasks": ["add", "count"], "train_per_task": 2, "val_per_task": 1},
            shard_samples=2,
        )
    )
    return out


@pytest.fixture
def raw(built) -> dict:
    return json.loads((built / "manifest.json").read_text())


def train(m: dict) -> dict:
    return m["splits"]["train"]


def grow(m: dict, n: int, bytes_: int | None = None) -> None:
    """Give train shard 0 ``n`` more samples (and frames), with every total kept consistent."""
    s, sh = train(m), train(m)["shards"][0]
    for d in (s, sh):
        d["samples"] += n
        d["frames"] += n
    s["inputs"] += n
    s["tasks"]["add"] += n
    if bytes_ is not None:
        sh["bytes"] = bytes_


def setter(path: str, value):
    """An edit that sets ``a.b[2].c`` of the manifest dict to ``value``."""

    def edit(m):
        *head, last = _parts(path)
        for p in head:
            m = m[p]
        m[last] = value

    return edit


def _parts(path: str) -> list:
    out = []
    for word in path.split("."):
        name, *idx = word.replace("]", "").split("[")
        out += [name] + [int(i) for i in idx]
    return out


SH0 = "splits.train.shards[0]"

# id -> (edit, the field path the error names, a fragment of its reason)
CASES = {
    "count is a string": (
        setter(f"{SH0}.samples", "2"),
        f"{SH0}.samples",
        "str '2' is not a count",
    ),
    "count is a bool": (setter(f"{SH0}.samples", True), f"{SH0}.samples", "bool True is not a"),
    "count is negative": (setter(f"{SH0}.frames", -1), f"{SH0}.frames", "int -1 is not a count"),
    "count is a float": (setter("splits.train.samples", 4.0), "splits.train.samples", "float"),
    "split is a list": (setter("splits.train", []), "splits.train", "expected an object, got list"),
    "shard is a list": (setter(f"{SH0}", ["x"]), SH0, "expected an object, got list"),
    "shards is an object": (
        setter("splits.train.shards", {}),
        "splits.train.shards",
        "dict {} is not list",
    ),
    "shard field missing": (
        lambda m: train(m)["shards"][1].pop("sha256"),
        "splits.train.shards[1]",
        "missing field(s) sha256",
    ),
    "shard field unknown": (setter(f"{SH0}.url", "x"), SH0, "unknown field(s) url"),
    "absurd count": (lambda m: grow(m, 10**12), f"{SH0}.samples", "cannot fit in 20480 bytes"),
    "one sample too many": (
        lambda m: grow(m, 20480 // MIN_SAMPLE_BYTES - 1),  # 11 samples in 20480 bytes
        f"{SH0}.samples",
        "11 samples cannot fit in 20480 bytes",
    ),
    "bytes beyond any file": (
        setter(f"{SH0}.bytes", 2**63),
        f"{SH0}.bytes",
        "larger than any file can be",
    ),
    "sha256 too short": (setter(f"{SH0}.sha256", "abc"), f"{SH0}.sha256", "not 64 lowercase hex"),
    "sha256 upper case": (setter(f"{SH0}.sha256", "A" * 64), f"{SH0}.sha256", "not 64 lowercase"),
    "sha256 a number": (setter(f"{SH0}.sha256", 7), f"{SH0}.sha256", "int 7 is not str"),
    "path absolute": (setter(f"{SH0}.path", "/etc/passwd"), f"{SH0}.path", "is absolute"),
    "path climbs out": (
        setter(f"{SH0}.path", "train/../../x.tar"),
        f"{SH0}.path",
        "leaves the dataset directory",
    ),
    "path is a pipe": (setter(f"{SH0}.path", "pipe:cat x.tar"), f"{SH0}.path", "pipe:"),
    "path is a folder": (setter(f"{SH0}.path", "train/"), f"{SH0}.path", "names a folder"),
    "path is empty": (setter(f"{SH0}.path", ""), f"{SH0}.path", "is empty"),
    "path listed twice": (
        setter("splits.train.shards[1].path", "train/./shard-000000.tar"),
        "splits.train.shards[1].path",
        "listed twice (also splits.train.shards[0])",
    ),
    "split samples off": (
        setter("splits.train.samples", 5),
        "splits.train.samples",
        "5, but its shards hold 4 samples",
    ),
    "split frames off": (
        setter("splits.train.frames", 21),
        "splits.train.frames",
        "21, but its shards hold 20 frames",
    ),
    "tasks do not sum": (setter("splits.train.tasks.add", 3), "splits.train.tasks", "sum to 5"),
    "task count negative": (
        setter("splits.val.tasks.add", -1),
        "splits.val.tasks.add",
        "not a count",
    ),
    "inputs off": (
        setter("splits.val.inputs", 3),
        "splits.val.inputs",
        "3, but samples + quarantined = 2 + 0",
    ),
    "frames fewer than samples": (
        lambda m: (setter(f"{SH0}.frames", 1)(m), setter("splits.train.frames", 11)(m)),
        f"{SH0}.frames",
        "1 frames for 2 samples",
    ),
    "quarantined of no split": (
        setter("quarantined", [{"split": "test", "source": "x", "reason": "y"}]),
        "quarantined[0].split",
        "'test' is not a split",
    ),
    "quarantined entry a string": (
        setter("quarantined", ["x"]),
        "quarantined[0]",
        "expected an object, got str",
    ),
    "quarantined a dict": (setter("quarantined", {}), "quarantined", "dict {} is not list"),
    "frame height a string": (
        setter("render_spec.height", "64"),
        "render_spec.height",
        "str '64' is not a frame side",
    ),
    "frame width absurd": (
        setter("render_spec.width", 10**9),
        "render_spec.width",
        "is not a frame side in (8, 1024)",
    ),
    "shard_samples zero": (
        setter("shard_samples.train", 0),
        "shard_samples.train",
        "is not an int >= 1",
    ),
    "builder a number": (setter("builder", 5), "builder", "int 5 is not str"),
    "format_version a bool": (setter("format_version", True), "format_version", "bool True"),
    "commands hold a number": (setter("commands", ["evav", 1]), "commands[1]", "int 1 is not str"),
    "splits a list": (setter("splits", []), "splits", "list [] is not dict"),
}


@pytest.mark.parametrize("name", CASES)
def test_malformed_manifest_names_the_field(raw, name):
    edit, path, reason = CASES[name]
    m = copy.deepcopy(raw)
    edit(m)
    with pytest.raises(ValueError) as e:
        Manifest.from_dict(m, "D/manifest.json")
    assert str(e.value).startswith(f"D/manifest.json: {path}: "), str(e.value)
    assert reason in str(e.value)


@pytest.mark.parametrize("top", [[], "x", 3, None])
def test_manifest_that_is_not_an_object(top):
    with pytest.raises(ValueError, match="^D/m.json: expected an object"):
        Manifest.from_dict(top, "D/m.json")


def test_real_manifest_passes_and_round_trips(built, raw):
    m = load_manifest(built)
    assert m.to_dict() == raw and m.num_samples == 6 and m.frame_size == (64, 64)
    assert all(
        sh.samples * MIN_SAMPLE_BYTES <= sh.bytes for s in m.splits.values() for sh in s.shards
    )


def test_consistent_quarantine_and_tight_count_pass(raw):
    m = copy.deepcopy(raw)
    m["quarantined"] = [{"split": "train", "source": "synthetic:train:9", "reason": "bad"}]
    train(m)["inputs"] += 1
    grow(m, 20480 // MIN_SAMPLE_BYTES - 2)  # exactly 10 samples of 2048 bytes in 20480
    assert Manifest.from_dict(m).splits["train"].shards[0].samples == 10


def test_version_1_is_refused_with_the_rebuild_hint(raw):
    raw["format_version"] = 1
    with pytest.raises(ValueError, match="format_version 1.*rebuild with `evav preprocess`"):
        Manifest.from_dict(raw)


def write(d: Path, m) -> Path:
    (d / "manifest.json").write_text(m if isinstance(m, str) else json.dumps(m))
    return d


@pytest.fixture
def d(built, tmp_path) -> Path:
    dst = tmp_path / "d"
    shutil.copytree(built, dst)
    return dst


@pytest.mark.parametrize(
    "text, reason",
    [
        ("{", "not valid JSON (JSONDecodeError"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON (RecursionError"),
        ('{"seed": ' + "9" * 5000 + "}", "not valid JSON (ValueError: Exceeds the limit"),
        (b"\xff\xfe\x00".decode("latin-1"), "not valid JSON"),
        ("[]", "expected an object, got list"),
    ],
)
def test_unreadable_manifest_file(d, text, reason):
    write(d, text)
    with pytest.raises(ValueError) as e:
        load_manifest(d)
    assert str(e.value).startswith(f"{d / 'manifest.json'}: ") and reason in str(e.value)


def test_oversized_manifest_file_is_not_read(d, monkeypatch):
    monkeypatch.setattr(evav.manifest, "MAX_MANIFEST_BYTES", 1000)  # the real cap is 1 GiB
    with pytest.raises(ValueError, match=r"manifest.json: \d+ bytes, too large for a manifest"):
        load_manifest(d)


def test_count_that_fits_the_manifest_bytes_but_not_the_file(d, raw):
    grow(raw, 10**12, bytes_=2**62)  # a manifest that lies about bytes too
    write(d, raw)
    with pytest.raises(ValueError) as e:
        load_manifest(d)
    assert str(e.value) == (
        f"{d / 'manifest.json'}: {SH0}.samples: 1000000000002 samples cannot fit in 20480 bytes, "
        f"the size of {d / 'train/shard-000000.tar'} (a sample takes at least 2048 bytes of tar)"
    )
    assert load_manifest(d, check_files=False).splits["train"].samples == 10**12 + 4


@pytest.mark.parametrize("bytes_", [None, 2**62])
def test_loader_refuses_absurd_counts_before_allocating(d, raw, bytes_):
    grow(raw, 10**12, bytes_)
    write(d, raw)
    want = f"{d / 'manifest.json'}: {SH0}.samples: 1000000000002 samples cannot fit in 20480 bytes"
    with pytest.raises(ValueError, match=f"^{re.escape(want)}"):
        Loader(DataConfig(train=[str(d)]), batch_size=2)


def test_loader_refuses_wrong_types_with_the_field(d, raw):
    train(raw)["shards"][1]["frames"] = [10]
    write(d, raw)
    with pytest.raises(ValueError, match=r"splits\.train\.shards\[1\]\.frames: list \[10\] is not"):
        Loader(DataConfig(train=[str(d)]), batch_size=2)
