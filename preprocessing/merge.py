"""The merge: every shard record of a build -> ``DIR/manifest.json`` (evav.manifest.Manifest).

Runs at the end of a single-part build, or as its own step after all parts of a multi-part
build (`evav preprocess --merge --out DIR`, the dependent job in slurm/preprocess.sbatch). It
refuses to write a manifest while any shard is missing, and says which part should build it.
Merging is idempotent: the manifest depends only on the records, never on the order parts ran.

Beside the manifest it writes one ``wids-SPLIT.json`` per split: the dataset-level descriptor
(``wids-shard-index-v1``: each shard's relative url, sample count and size) with which
webdataset's indexed reader opens the split, ``wids.ShardListDataset("DIR/wids-train.json")``.
wids indexes a local shard itself (an mmap over its tar headers); evav's own readers never read
these files. They are written before the manifest, which is written last: a dataset whose
manifest exists is complete.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from evav.manifest import (
    Manifest,
    Quarantined,
    ShardInfo,
    SplitInfo,
    save_manifest,
    write_json_atomic,
)
from preprocessing.layout import STATE, plan_path, read_json, read_record


def merge(out: str | Path) -> Manifest:
    """Write ``out/manifest.json`` from the shard records; ValueError if shards are missing."""
    out = Path(out)
    if not plan_path(out).is_file():
        raise ValueError(f"{out}: no build here (expected {plan_path(out)}; run evav preprocess)")
    plan = read_json(plan_path(out))
    parts = sorted((out / STATE).glob("part-*.json"))
    num_parts = max((read_json(p)["num_parts"] for p in parts), default=1)
    splits, quarantined, missing, n = {}, [], [], 0
    for split, s in sorted(plan["splits"].items()):
        shards, tasks, frames, samples, inputs = [], Counter(), 0, 0, 0
        for index in range(math.ceil(s["inputs"] / s["shard_samples"])):
            rec = read_record(out, split, index)
            if rec is None:
                missing.append(f"{split}/shard-{index:06d} (part {n % num_parts})")
            else:
                inputs += rec["inputs"]
                samples += rec["samples"]
                frames += rec["frames"]
                tasks.update(rec["tasks"])
                quarantined += [
                    Quarantined(split, q["source"], q["reason"]) for q in rec["quarantined"]
                ]
                if rec["samples"]:
                    shards.append(
                        ShardInfo(
                            rec["path"],
                            rec["samples"],
                            rec["frames"],
                            rec["bytes"],
                            rec["sha256"],
                            index=rec.get("index"),  # records written before indexes have none
                            index_sha256=rec.get("index_sha256"),
                        )
                    )
                assert rec["inputs"] == rec["samples"] + len(rec["quarantined"]), rec
            n += 1
        splits[split] = SplitInfo(samples, frames, inputs, dict(sorted(tasks.items())), shards)
    if missing:
        raise ValueError(
            f"{out}: {len(missing)} of {n} shards are not built yet, e.g. "
            f"{', '.join(missing[:5])}; run (or rerun) those parts, then merge again"
        )
    commands = []
    for p in parts:
        cmd = read_json(p)["command"]
        if cmd and cmd not in commands:
            commands.append(cmd)
    manifest = Manifest(
        builder=plan["builder"],
        builder_version=plan["builder_version"],
        options=plan["options"],
        render_spec=plan["render_spec"],
        render_hash=plan["render_hash"],
        codec=plan["codec"],
        seed=plan["seed"],
        shard_samples={k: v["shard_samples"] for k, v in plan["splits"].items()},
        splits=splits,
        quarantined=quarantined,
        commands=commands,
        code_version=plan["code_version"],
        limit=_limit(plan),
    )
    for split, info in splits.items():
        write_json_atomic(out / wids_name(split), wids_descriptor(manifest.builder, split, info))
    save_manifest(out, manifest)
    return manifest


WIDS_KIND = "wids-shard-index-v1"


def _limit(plan: dict) -> dict | None:
    """What ``--limit`` kept, for the manifest: N per split, stratified, and per class."""
    if plan.get("limit") is None:
        return None
    per_class = {k: v["strata"] for k, v in plan["splits"].items() if "strata" in v}
    return {**plan["limit"], "per_class": per_class}


def wids_name(split: str) -> str:
    return f"wids-{split}.json"


def wids_descriptor(builder: str, split: str, info: SplitInfo) -> dict:
    """webdataset's wids descriptor of one split: shard urls relative to the dataset folder."""
    return {
        "__kind__": WIDS_KIND,
        "wids_version": 1,
        "name": f"{builder}-{split}",
        "shardlist": [
            {"url": sh.path, "nsamples": sh.samples, "filesize": sh.bytes} for sh in info.shards
        ],
    }
