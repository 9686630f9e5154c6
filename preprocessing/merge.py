"""The merge: every shard record of a build -> ``DIR/manifest.json`` (evav.manifest.Manifest).

Runs at the end of a single-part build, or as its own step after all parts of a multi-part
build (`evav preprocess --merge --out DIR`, the dependent job in slurm/preprocess.sbatch). It
refuses to write a manifest while any shard is missing, and says which part should build it.
Merging is idempotent: the manifest depends only on the records, never on the order parts ran.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from evav.manifest import Manifest, Quarantined, ShardInfo, SplitInfo, save_manifest
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
    )
    save_manifest(out, manifest)
    return manifest
