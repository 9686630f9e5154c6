"""`evav preprocess --limit N`: N inputs per split, stratified by class, drawn with --seed.

Real data (../shared/datasets, skipped when absent): CIFAR-10 and FSDD keep every class in
proportion. The same command gives the same bytes, however the build is cut (workers, parts);
another seed draws other inputs; a builder without labels gets a seeded uniform sample. The
selection is kept in the builder's order, and the plan records it per class.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from evav.cli import main
from evav.frames import RenderSpec
from evav.manifest import Manifest, load_manifest
from preprocessing.builders import Item
from preprocessing.builders.text import TextBuilder, TextOptions
from preprocessing.runner import limit_items
from tests.test_preprocess import read_samples


def build(builder: str, src: Path | None, out: Path, *extra: str) -> Manifest:
    args = ["preprocess", builder, "--out", str(out), *extra]
    if src is not None:
        args += ["--src", str(src)]
    assert main(args) == 0
    return load_manifest(out)


def per_split(out: Path, field: str) -> dict[str, list]:
    """split -> the samples' ``field`` values, in key (= build) order."""
    found: dict[str, list] = {}
    for _key, (meta, _) in sorted(read_samples(out).items()):
        found.setdefault(meta.split, []).append(getattr(meta, field))
    return found


def plan(out: Path) -> dict:
    return json.loads((out / ".build" / "plan.json").read_text())


def shard_bytes(out: Path, m: Manifest) -> dict[str, bytes]:
    return {sh.path: (out / sh.path).read_bytes() for s in m.splits.values() for sh in s.shards}


def test_cifar10_limit_50_keeps_every_class_in_proportion(datasets, tmp_path):
    m = build("cifar10", datasets / "cifar10", tmp_path, "--limit", "50")
    assert {s.samples for s in m.splits.values()} == {50} and not m.quarantined
    labels = per_split(tmp_path, "label")
    for split, found in labels.items():
        assert Counter(found) == {c: 5 for c in range(10)}, split  # 10% of each split each
    sources = per_split(tmp_path, "source")
    for found in sources.values():  # in the builder's order: class folders, then files
        assert found == sorted(found)
    p = plan(tmp_path)
    assert p["limit"] == {"per_split": 50, "stratified": True}
    assert p["splits"]["test"]["strata"] == {str(c): 5 for c in range(10)}
    assert "--limit 50" in m.commands[0]


def test_fsdd_limit_keeps_every_digit(datasets, tmp_path):
    m = build("fsdd", datasets / "fsdd", tmp_path, "--limit", "20", "--seed", "3")
    for split, found in per_split(tmp_path, "label").items():
        assert Counter(found) == {d: 2 for d in range(10)}, split
    assert m.splits["train"].samples == m.splits["test"].samples == 20


def test_fewer_than_the_classes_are_distinct_classes_chosen_by_the_seed(datasets, tmp_path):
    chosen = []
    for seed in (0, 1, 2, 3):
        out = tmp_path / f"s{seed}"
        build("fsdd", datasets / "fsdd", out, "--limit", "4", "--seed", str(seed))
        labels = per_split(out, "label")["test"]
        assert len(set(labels)) == 4  # never two of one digit while a digit is missing
        chosen.append(tuple(sorted(labels)))
    assert len(set(chosen)) > 1  # not always the first digits


def test_same_seed_same_bytes_however_the_build_is_cut(datasets, tmp_path):
    src, args = datasets / "fsdd", ["--limit", "12", "--shard-samples", "4"]
    one = build("fsdd", src, tmp_path / "one", *args)
    again = build("fsdd", src, tmp_path / "again", *args, "--workers", "2")
    parts = tmp_path / "parts"
    for part in (1, 0):  # every part computes the same selection on its own
        rc = main(
            ["preprocess", "fsdd", "--src", str(src), "--out", str(parts), *args]
            + ["--num-parts", "2", "--part", str(part)]
        )
        assert rc == 0
    merged = load_manifest(parts)
    reference = shard_bytes(tmp_path / "one", one)
    assert len(reference) == 6
    assert shard_bytes(tmp_path / "again", again) == reference
    assert shard_bytes(parts, merged) == reference

    build("fsdd", src, tmp_path / "other", *args, "--seed", "1")
    a, b = per_split(tmp_path / "one", "source"), per_split(tmp_path / "other", "source")
    assert a["train"] != b["train"] and a["test"] != b["test"]
    for out in ("one", "other"):  # 12 of 10 equal digits: one each, two more chosen by the seed
        counts = Counter(per_split(tmp_path / out, "label")["train"])
        assert set(counts) == set(range(10)) and sorted(counts.values())[-3:] == [1, 2, 2]


def test_a_rerun_with_another_seed_into_the_same_out_is_refused(datasets, tmp_path, capsys):
    src = datasets / "fsdd"
    build("fsdd", src, tmp_path, "--limit", "5")
    args = ["--src", str(src), "--out", str(tmp_path), "--limit", "5", "--seed", "1"]
    rc = main(["preprocess", "fsdd", *args])
    assert rc == 2 and "seed" in capsys.readouterr().err


def test_a_builder_without_labels_gets_a_seeded_uniform_sample(tmp_path):
    raw = tmp_path / "train.txt"
    raw.write_text("".join(f"document number {i}\n" for i in range(40)))
    picks = {}
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        m = build("text", raw, out, "--limit", "6", "--seed", str(seed), "clip_tokens=8")
        assert m.splits["train"].samples == 6
        lines = [int(s.split(":")[1]) for s in per_split(out, "source")["train"]]
        assert lines == sorted(lines)  # the builder's order
        picks[seed] = lines
        assert plan(out)["splits"]["train"]["strata"] == {"": 6}
    assert picks[0] != picks[1] and picks[0] != list(range(1, 7))


# -- the allocation itself ---------------------------------------------------------------------
def builder(seed: int = 5) -> TextBuilder:
    return TextBuilder(None, TextOptions(), RenderSpec(), seed=seed)


def items(counts: dict) -> list[Item]:
    return [Item(f"{k}:{i}", None, k) for k, n in counts.items() for i in range(n)]


def strata(its: list[Item]) -> Counter:
    return Counter(it.stratum for it in its)


def test_allocation_is_proportional_with_a_minimum_of_one_per_label(monkeypatch):
    monkeypatch.setattr(TextBuilder, "needs_src", False)
    b = builder()
    assert strata(limit_items(b, "train", items({"a": 90, "b": 10}), 10)) == {"a": 9, "b": 1}
    assert strata(limit_items(b, "train", items({"a": 98, "b": 1, "c": 1}), 3)) == {
        "a": 1,
        "b": 1,
        "c": 1,
    }
    # unlabelled items get their share but no minimum
    kept = limit_items(b, "train", items({"a": 50, "b": 49, None: 1}), 2)
    assert strata(kept) == {"a": 1, "b": 1}
    its = items({"a": 3, "b": 2})
    assert limit_items(b, "train", its, 9) == its and limit_items(b, "train", its, 0) == []
    kept = limit_items(b, "train", items({k: 7 for k in "abcdefg"}), 30)
    assert sorted(strata(kept).values()) == [4, 4, 4, 4, 4, 5, 5]
    assert kept == sorted(kept, key=lambda it: ("abcdefg".index(it.stratum), it.source))


def test_allocation_depends_on_the_seed_and_the_split_only(monkeypatch):
    monkeypatch.setattr(TextBuilder, "needs_src", False)
    its = items({"a": 40, "b": 40})
    first = limit_items(builder(), "train", its, 10)
    assert limit_items(builder(), "train", its, 10) == first
    assert limit_items(builder(), "test", its, 10) != first
    assert limit_items(builder(6), "train", its, 10) != first
    assert np.all([strata(first)[k] == 5 for k in "ab"])
