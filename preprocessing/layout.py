"""Where a build keeps its files inside the output folder ``DIR``.

    DIR/manifest.json                        written last, by the merge (evav.manifest)
    DIR/{split}/shard-NNNNNN.tar             finished shards (renamed into place when complete)
    DIR/{split}/.shard-NNNNNN.tar.tmp-*      a shard being written (never listed anywhere)
    DIR/.build/plan.json                     what is being built: inputs and shard size per split
    DIR/.build/part-IIII-of-NNNN.json        the command line of each part
    DIR/.build/{split}/shard-NNNNNN.json     a finished shard's record (counts, quarantine)

A shard is done when its record exists; the record is written after the tar is renamed, so a
kill between the two only redoes that shard.
"""

from __future__ import annotations

import json
from pathlib import Path

from preprocessing.shards import shard_name

STATE = ".build"
RECORD_FIELDS = "split index inputs samples frames tasks quarantined path bytes".split()


def plan_path(out: Path) -> Path:
    return out / STATE / "plan.json"


def part_path(out: Path, part: int, num_parts: int) -> Path:
    return out / STATE / f"part-{part:04d}-of-{num_parts:04d}.json"


def record_path(out: Path, split: str, index: int) -> Path:
    return out / STATE / split / f"shard-{index:06d}.json"


def shard_path(out: Path, split: str, index: int) -> Path:
    return out / split / shard_name(index)


def read_json(path: Path) -> dict:
    """A build file's JSON object; ValueError naming the file if it is unreadable or not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(
            f"{path}: unreadable build file ({e}); delete --out to start over"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object; delete --out to start over")
    return data


def read_record(out: Path, split: str, index: int) -> dict | None:
    """The record of a finished shard, or None if the shard is not (completely) done."""
    path = record_path(out, split, index)
    if not path.is_file():
        return None
    rec = read_json(path)
    if any(k not in rec for k in RECORD_FIELDS) or not isinstance(rec["quarantined"], list):
        raise ValueError(f"{path}: not a shard record; delete --out to start over")
    if rec["samples"]:
        tar = out / rec["path"]
        if not tar.is_file() or tar.stat().st_size != rec["bytes"]:
            return None
    return rec
