"""`evav eval --limit`: a seeded, stratified sample per task; and the majority-answer baseline.

The regression: FSDD's test split is sorted by digit, so the first 50 samples were all "zero"
and "one", scored against a chance of 0.1. Here real FSDD recordings (../shared/datasets) are
built into shards and the limited split must hold every digit in proportion.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from evav.cli import main
from evav.eval.readers import majority_baseline
from evav.eval.samples import EvalSample, Skipped, allocate, load_eval_data, stratified

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def fsdd(datasets, tmp_path_factory) -> Path:
    """FSDD shards of 2 speakers x 10 digits x takes 0-2 (test) and 5 (train): 60 test samples,
    sorted by digit as the recordings are."""
    root = tmp_path_factory.mktemp("fsdd")
    src = root / "src" / "recordings"
    src.mkdir(parents=True)
    for digit in range(10):
        for speaker in ("george", "jackson"):
            for take in (0, 1, 2, 5):
                name = f"{digit}_{speaker}_{take}.wav"
                os.symlink(datasets / "fsdd" / "recordings" / name, src / name)
    out = root / "shards"
    assert main(["preprocess", "fsdd", "--src", str(src.parent), "--out", str(out)]) == 0
    return out


def test_limited_fsdd_holds_every_digit_in_proportion(fsdd):
    full = load_eval_data([str(fsdd)], "test")
    assert Counter(s.meta["answer"] for s in full.samples) == {d: 6 for d in DIGITS}
    assert [s.meta["answer"] for s in full.samples[:12]] == ["zero"] * 6 + ["one"] * 6  # sorted
    data = load_eval_data([str(fsdd)], "test", limit=20)
    assert Counter(s.meta["answer"] for s in data.samples) == {d: 2 for d in DIGITS}
    # still in split order, candidates still from the whole split
    keys = [s.key for s in full.samples]
    chosen = [keys.index(s.key) for s in data.samples]
    assert chosen == sorted(chosen) and len(data.population) == 60
    # deterministic for a seed, another sample for another seed
    again = load_eval_data([str(fsdd)], "test", limit=20)
    assert [s.key for s in again.samples] == [s.key for s in data.samples]
    other = load_eval_data([str(fsdd)], "test", limit=20, seed=1)
    assert [s.key for s in other.samples] != [s.key for s in data.samples]
    assert Counter(s.meta["answer"] for s in other.samples) == {d: 2 for d in DIGITS}
    # fewer than the classes: no class twice, and no limit at all: everything
    few = load_eval_data([str(fsdd)], "test", limit=7)
    assert len(few.samples) == 7 and len({s.meta["answer"] for s in few.samples}) == 7
    assert len(load_eval_data([str(fsdd)], "test", limit=1000).samples) == 60


def sample(task: str, answer: str, i: int) -> EvalSample:
    return EvalSample("d", "s.tar", i, {"key": f"{i:04d}", "task": task, "answer": answer})


def test_allocation_is_proportional_and_keeps_every_class():
    assert allocate({"a": 90, "b": 10}, 10) == {"a": 9, "b": 1}
    assert allocate({"a": 98, "b": 1, "c": 1}, 10) == {"a": 8, "b": 1, "c": 1}
    assert allocate({"a": 5, "b": 5, "c": 5}, 4) == {"a": 2, "b": 1, "c": 1}
    assert allocate({"a": 3, "b": 2}, 2) == {"a": 1, "b": 1}
    assert allocate({"a": 3, "b": 2}, 9) == {"a": 3, "b": 2}
    assert sum(allocate({"a": 1, "b": 1, "c": 1}, 2).values()) == 2


def test_stratified_is_per_task_and_counts_bad_samples_of_a_task():
    items = [sample("t", "x" if i < 30 else "y", i) for i in range(40)]
    items += [sample("u", "z", 100 + i) for i in range(5)]
    items.append(Skipped("d", "s.tar key 'bad'", "t", "checksum", "bad bytes"))
    got = stratified(items, 10, seed=3)
    per_task = Counter((x.task, x.meta["answer"]) for x in got if isinstance(x, EvalSample))
    assert per_task == {("t", "x"): 7, ("t", "y"): 2, ("u", "z"): 5}
    assert sum(isinstance(x, Skipped) for x in got) == 1  # 1 of 41 tried: its own class
    assert got == sorted(got, key=items.index)
    assert stratified(items, 10, seed=3) == got
    with pytest.raises(ValueError, match="--limit must be >= 1"):
        stratified(items, 0)


def test_majority_baseline_and_answer_distribution():
    recs = [{"true": t, "pred": "x"} for t in ["b", "a", "b", "c", "b", "a"]]
    assert majority_baseline(recs) == {
        "answers": [["b", 3], ["a", 2], ["c", 1]],
        "majority_answer": "b",
        "majority": 0.5,
    }
    assert majority_baseline([{"true": ["a"]}]) == {}  # multi-label: no single answer
    assert majority_baseline([]) == {}


def test_answers_from_the_data_cannot_break_the_table():
    from evav.eval.report import summary_table

    task = {"kind": "classification", "samples": 3, "skipped": {}, "skipped_total": 0}
    hostile = [["a|b\nc", 2], ["<b>x</b>", 1], ["ok", 1], ["y", 1], ["z", 1]]
    results = {
        "tasks": {
            "t": {**task, "accuracy": 0.5, "chance": 0.2, "majority": 0.4, "answers": hostile}
        }
    }
    row = summary_table(results).splitlines()[2]
    assert row.count("|") - row.count("\\|") == 10 and "\n" not in row and "<b>" not in row
    assert row.endswith(r"| a\|b\\u000ac 2, \<b\>x\</b\> 1, ok 1, y 1, ... (5 answers) |"), row
    assert "| 0.500 | 0.200 | 0.400 majority |" in row
