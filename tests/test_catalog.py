"""The catalog (evav/data/catalog.py): manifests and shard indexes read once and handed on. With a
catalog, a loader and its DataLoader workers read no manifest and no index again; in training,
rank 0 reads it and the other ranks get its result, or its error, over the process group
(evav.distributed.from_main)."""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import evav.data.catalog as catalog_mod
import evav.data.shards as shards_mod
from evav import distributed as dist
from evav.data import DataConfig, Loader
from evav.data.catalog import read_catalog
from evav.manifest import load_manifest
from preprocessing.runner import BuildConfig, build
from tools.mlflow_server import free_port

OPTIONS = {"tasks": ["add", "count"], "train_per_task": 4, "val_per_task": 2}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("catalog") / "d"
    build(BuildConfig("synthetic", str(out), options=OPTIONS, shard_samples=2))
    return out


def keys(loader: Loader, n: int) -> list[str]:
    it = iter(loader)
    return [k for _ in range(n) for k in next(it)["key"]]


def test_the_catalog_lists_every_shard_and_its_index(built):
    cat = read_catalog([built], ["train", "val", "test"])  # a split the build lacks is skipped
    m = load_manifest(built)
    assert set(cat.paths) == {(0, "train"), (0, "val")}
    for split in ("train", "val"):
        paths = cat.paths[(0, split)]
        assert [Path(p).relative_to(built).as_posix() for p in paths] == [
            sh.path for sh in m.splits[split].shards
        ]
        for p, sh in zip(paths, m.splits[split].shards):
            assert cat.indexes[p].from_file and len(cat.indexes[p].keys) == sh.samples
    assert not cat.no_index
    assert "indexes read in" in cat.summary()


def test_workers_given_a_catalog_read_no_manifest_and_no_index(built, tmp_path, monkeypatch):
    """Every call into the index readers, in the consumer or any forked worker, is written to a
    file; with a catalog there is none, and the batches equal those of a loader reading alone.
    The manifest and index files are even removed after the catalog is read."""
    d = tmp_path / "d"
    shutil.copytree(built, d)
    cfg = DataConfig(train=[str(d)], num_workers=2)
    alone = keys(Loader(cfg, batch_size=2, seed=3), 4)
    cat = read_catalog([d], ["train"])
    (d / "manifest.json").unlink()
    for f in d.glob("*/*.idx.json"):
        f.unlink()
    calls = tmp_path / "calls"

    def probe(name, fn):
        def wrapped(*a, **k):
            with open(calls, "a") as f:
                f.write(f"{os.getpid()} {name} {a[0]}\n")
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(shards_mod, "load_index", probe("load_index", shards_mod.load_index))
    monkeypatch.setattr(shards_mod, "index_shard", probe("index_shard", shards_mod.index_shard))
    monkeypatch.setattr(catalog_mod, "load_manifest", probe("manifest", catalog_mod.load_manifest))
    shared = keys(Loader(cfg, batch_size=2, seed=3, catalog=cat), 4)
    assert shared == alone
    assert not calls.exists(), calls.read_text()


def test_a_catalog_of_other_directories_is_refused(built, tmp_path):
    other = tmp_path / "o"
    shutil.copytree(built, other)
    with pytest.raises(ValueError, match="catalog of"):
        Loader(DataConfig(train=[str(built)]), catalog=read_catalog([other], ["train"]))


def _from_main_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    calls = []

    def good():
        calls.append(rank)
        return {"read by": rank}

    def bad():
        raise ValueError("data.train entry /nowhere: no manifest.json")

    result = {"good": dist.from_main(good), "calls": calls}
    try:
        dist.from_main(bad)
    except ValueError as e:
        result["error"] = str(e)
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def test_from_main_runs_once_and_gives_every_rank_its_result_or_its_error(tmp_path):
    mp.start_processes(
        _from_main_rank, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert [g["good"] for g in got] == [{"read by": 0}] * 2
    assert [g["calls"] for g in got] == [[0], []]  # only rank 0 ran it
    assert [g["error"] for g in got] == ["data.train entry /nowhere: no manifest.json"] * 2
