"""Loader start-up: seconds to the first batch, and the file operations before it, over many shards.

    .venv/bin/python tools/bench_startup.py                   # prints the table only
    .venv/bin/python tools/bench_startup.py --write --label before   # and writes its section
    .venv/bin/python tools/bench_startup.py --shards DIR      # shards an earlier run kept (--keep DIR)

Builds a synthetic dataset of --num-shards train shards (`evav preprocess synthetic
--shard-samples 2`, 2 samples of 6 frames at 64x64 each) into a temporary folder, then, for each
configuration (DataLoader workers per rank x ranks), starts a fresh Python process that reads
the catalog (manifest and shard indexes, evav/data/catalog.py) once, as rank 0 does in
training, builds the Loader(s) on it and takes one batch from each rank (batch 8, window 4,
PyAV). Ranks > 1 are several Loader objects (rank r of world_size R) in that one process, their
workers all started before the first batch is taken, as R ranks on one host would.

- seconds: from just before ``Loader(...)`` (manifest read and checked) to the first batch in
  hand (every rank's), imports excluded; median of --repeats processes, configurations taken in
  turn. The shards were just written, so the page cache is warm: this is metadata and CPU cost,
  not disk latency.
- operations: one more process per configuration under ``strace -f -ff -ttt -y``, counting the
  system calls on paths inside the dataset folder of every process (the consumer and its
  DataLoader workers) made before the consumer had its first batch (a marker ``stat`` of a
  path that does not exist, after the batch, gives the cut): opens (``openat``), stats
  (``stat``, ``lstat``, ``newfstatat``, ``statx``, ``fstat``), seeks (``lseek``), reads
  (``read``, ``pread64``, ``readv``) and the bytes they returned, and the distinct shard files
  opened. Nothing in evav is wrapped or mocked; strace is needed (``apt-get install strace``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OUT_MD = REPO / "docs" / "benchmarks.md"
MARKER = "/evav-bench-startup-first-batch"  # stat'ed (absent) right after the first batch
MARKER_INIT = "/evav-bench-startup-loader-built"  # and right after Loader(...)
SYSCALLS = "openat,open,stat,lstat,newfstatat,statx,fstat,read,pread64,readv,lseek"
KINDS = {
    "openat": "opens",
    "open": "opens",
    "stat": "stats",
    "lstat": "stats",
    "newfstatat": "stats",
    "statx": "stats",
    "fstat": "stats",
    "lseek": "seeks",
    "read": "reads",
    "pread64": "reads",
    "readv": "reads",
}


# -- the measured process ----------------------------------------------------------------------
def child(data: str, workers: int, ranks: int, batch_size: int) -> None:
    """Build ``ranks`` Loaders, take each one's first batch; print the seconds as JSON."""
    from evav.data import DataConfig, Loader
    from evav.data.catalog import read_catalog

    cfg = DataConfig(train=[data], num_workers=workers)
    t0 = time.perf_counter()
    catalog = read_catalog(cfg.train, ["train"])  # once, as rank 0 reads it for every rank
    loaders = [
        Loader(cfg, rank=r, world_size=ranks, batch_size=batch_size, seed=0, catalog=catalog)
        for r in range(ranks)
    ]
    t_init = time.perf_counter() - t0
    try:
        os.stat(MARKER_INIT)  # the cut for the "in Loader()" counts
    except OSError:
        pass
    its = [iter(ld) for ld in loaders]  # every rank's workers start before any batch is taken
    batches = [next(it) for it in its]
    t_first = time.perf_counter() - t0
    try:
        os.stat(MARKER)  # the cut for the strace counts
    except OSError:
        pass
    assert all(b["frames"].shape[0] > 0 for b in batches)
    print(json.dumps({"init_s": t_init, "first_s": t_first}), flush=True)


def run_child(data: Path, workers: int, ranks: int, batch_size: int, prefix=()) -> dict:
    cmd = [
        *prefix,
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        str(data),
        str(workers),
        str(ranks),
        str(batch_size),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- strace ------------------------------------------------------------------------------------
_LINE = re.compile(r"^(\d+\.\d+) (\w+)\((.*)$")
_FD = re.compile(r"^(?:-?\d+|AT_FDCWD)<([^>]*)>")
_STR = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _target(name: str, args: str) -> str | None:
    """The file a traced call works on (from ``-y`` fd annotations or its path argument)."""
    fd = _FD.match(args)
    fdpath = fd.group(1) if fd else None
    if name in ("stat", "lstat", "open"):
        s = _STR.match(args)
        return s.group(1) if s else None
    if name in ("openat", "newfstatat", "statx"):
        s = _STR.search(args)
        if s is None:
            return fdpath
        p = s.group(1)
        if not p:  # AT_EMPTY_PATH: the fd itself
            return fdpath
        return p if p.startswith("/") or fdpath is None else f"{fdpath}/{p}"
    return fdpath


def parse_trace(files: list[Path], data: Path) -> dict:
    """Counts of calls on paths under ``data`` before the marker (see the module docstring)."""
    events, cut, cut_init = [], None, None
    root = str(data.resolve())
    for f in files:
        for line in f.read_text(errors="replace").splitlines():
            m = _LINE.match(line)
            if m is None or " = " not in line:
                continue  # signals, exits, unfinished calls
            ts, name, args = float(m.group(1)), m.group(2), m.group(3)
            if name in ("newfstatat", "stat", "statx") and f'"{MARKER}"' in args:
                cut = ts if cut is None else min(cut, ts)
                continue
            if name in ("newfstatat", "stat", "statx") and f'"{MARKER_INIT}"' in args:
                cut_init = ts if cut_init is None else min(cut_init, ts)
                continue
            path = _target(name, args)
            if path is None or not (path == root or path.startswith(root + "/")):
                continue
            ret = line.rsplit(" = ", 1)[1].split(" ", 1)[0]
            events.append((ts, name, path, int(ret) if ret.lstrip("-").isdigit() else -1))
    if cut is None:
        raise RuntimeError("no marker in the trace: the child did not reach its first batch")
    counts, shards = Counter(), set()
    for ts, name, path, ret in events:
        if ts > cut:
            continue
        kind = KINDS[name]
        counts[kind] += 1
        if cut_init is not None and ts <= cut_init:
            counts[f"init_{kind}"] += 1
        if kind == "reads" and ret > 0:
            counts["bytes"] += ret
        if kind == "opens" and path.endswith(".tar"):
            shards.add(path)
    counts["shards_opened"] = len(shards)
    return dict(counts)


def traced(data: Path, workers: int, ranks: int, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        prefix = ["strace", "-f", "-ff", "-ttt", "-y", "-s", "512", "-e", f"trace={SYSCALLS}"]
        prefix += ["-o", f"{tmp}/trace"]
        run_child(data, workers, ranks, batch_size, prefix)
        files = sorted(Path(tmp).glob("trace.*"))
        counts = parse_trace(files, data)
        counts["processes"] = len(files)  # threads too: strace -ff writes one file per task
        return counts


# -- the table ---------------------------------------------------------------------------------
def build(out: Path, num_shards: int) -> Path:
    from evav.cli import main as evav_main

    # 5 tasks x per_task samples, 2 per shard
    per_task = num_shards * 2 // 5
    args = ["preprocess", "synthetic", "--out", str(out), "--shard-samples", "2"]
    args += ["--workers", "2", f"train_per_task={per_task}", "val_per_task=2"]
    assert evav_main(args) == 0
    return out


def _span(xs: list[float]) -> str:
    lo, hi = f"{min(xs):.2f}", f"{max(xs):.2f}"
    return lo if lo == hi else f"{lo}-{hi}"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="0,1,8", help="DataLoader workers per rank, listed")
    ap.add_argument("--ranks", default="1,2", help="ranks (Loaders in one process), listed")
    ap.add_argument("--num-shards", type=int, default=200, help="train shards to build")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="timed processes per configuration")
    ap.add_argument("--shards", type=Path, help="use the dataset in DIR (from --keep), build none")
    ap.add_argument("--keep", type=Path, help="build the dataset into DIR and keep it")
    ap.add_argument("--write", action="store_true", help=f"write the section to {OUT_MD.name}")
    ap.add_argument("--label", default="before", help="section title suffix and marker name")
    ap.add_argument("--out", type=Path, default=OUT_MD)
    a = ap.parse_args(argv)
    if shutil.which("strace") is None:
        sys.exit("strace is needed for the operation counts (apt-get install -y strace)")
    from tools.benchlib import machine, write_section

    load_start = uptime()
    configs = [(w, r) for r in map(int, a.ranks.split(",")) for w in map(int, a.workers.split(","))]
    with tempfile.TemporaryDirectory() as tmp:
        data = a.shards or build(a.keep or Path(tmp) / "synthetic", a.num_shards)
        from evav.manifest import load_manifest

        m = load_manifest(data)
        n_shards = len(m.splits["train"].shards)
        n_all = sum(len(s.shards) for s in m.splits.values())
        times = {c: [] for c in configs}
        for _ in range(a.repeats):  # round-robin, so a busy spell hits every configuration alike
            for c in configs:
                times[c].append(run_child(data, *c, a.batch_size))
        rows, per_shard = [], []
        for w, r in configs:
            ops = traced(data, w, r, a.batch_size)
            per_shard.append(ops.get("init_stats", 0) / n_shards)
            first = statistics.median(t["first_s"] for t in times[(w, r)])
            init = statistics.median(t["init_s"] for t in times[(w, r)])
            rows.append(
                f"| {w} | {r} | {first:.2f} | {init:.3f} | {ops.get('opens', 0):,} "
                f"| {ops.get('shards_opened', 0)} | {ops.get('stats', 0):,} "
                f"| {ops.get('init_opens', 0)} / {ops.get('init_stats', 0)} "
                f"| {ops.get('seeks', 0):,} | {ops.get('reads', 0):,} "
                f"| {ops.get('bytes', 0) / 2**20:.2f} |"
            )
            print(rows[-1], flush=True)
    load_end = uptime()
    cmd = ".venv/bin/python tools/bench_startup.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    md = f"""## Loader start-up over {n_shards} shards (issue 18, {a.label}) (`tools/bench_startup.py`)

{machine()}; {len(os.sched_getaffinity(0))} cores usable. Load: `{load_start}` at the start,
`{load_end}` at the end. Command: `{cmd.strip()}`.

Dataset: `evav preprocess synthetic --shard-samples 2`, {n_shards} train shards ({n_all} with
val) of 2 clips (6 frames, 64x64, FFV1) each; batch {a.batch_size}, window 4, PyAV. Each cell is
a fresh process: read the catalog once (manifest and every shard index, as rank 0 does for all
ranks in training), build the Loader(s) on it (ranks > 1: that many Loaders, rank r of that
world size, in one process, all their workers started before any batch is taken), take one
batch from each.
"seconds to first batch" runs from just before the catalog is read (imports excluded) to every rank's
first batch in hand, median of {a.repeats} processes (cells taken in turn; warm page cache:
the shards were just written); "Loader()" is the part spent reading the catalog and
constructing the Loader(s). The
operation counts come from one more process under `strace -f -ff -ttt -y`: system calls on
paths inside the dataset folder by the consumer and all its DataLoader workers, before the
consumer had its first batch (stats: stat/lstat/newfstatat/statx/fstat; reads:
read/pread64/readv; bytes: what those reads returned; shards opened: distinct .tar files;
"in Loader()": the opens / stats made while reading the catalog and constructing the
Loader(s), before any worker).
With workers, the counts include what the other workers read while the first batch was on its
way (each prepares up to 2 batches ahead), so they vary from run to run, and strace slows the
processes it traces: read them as sizes, not exact figures. Reading the catalog made
{_span(per_shard)} stats per train shard, once for every rank.

| workers per rank | ranks | seconds to first batch | Loader() s | opens | shards opened | stats | in Loader(): opens / stats | seeks | reads | MiB read |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}
"""
    print(md)
    if a.write:
        write_section(f"startup-{a.label}", md, a.out)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(main())
