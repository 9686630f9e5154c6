"""Loader throughput: the same dataset read from local disk and from an S3-compatible server on
loopback (moto's, in a process of its own), with 0 and 2 DataLoader workers.

    .venv/bin/python tools/bench_remote.py                 # prints the table only
    .venv/bin/python tools/bench_remote.py --write         # and writes its section
    .venv/bin/python tools/bench_remote.py --data DIR      # a dataset built before (--keep DIR)

Builds FSDD spoken digits (`evav preprocess fsdd --limit 400 --shard-samples 16`: 400 train
clips in 25 shards) from ../shared/datasets (or --datasets), or, where that folder is absent, a
synthetic dataset of about as many shards (`evav preprocess synthetic`), into a temporary folder.
Starts moto's S3 server (`moto.server`'s app and request handler, as ``ThreadedMotoServer``
serves them) as a separate process on 127.0.0.1 and uploads the dataset folder as built to
``s3://evav-bench/<name>``. Then, for each cell (workers x source), a fresh Python process
builds the Loader as ``evav/train.py`` does (``Loader(cfg.data, split="train", rank=0,
world_size=1, batch_size=..., seed=...)``, ``data.train`` the folder or the URL, everything else
``DataConfig``'s defaults but ``data.num_workers``), takes the first batch, then --batches more:

- first batch s: from just before ``Loader(...)`` (imports excluded; the manifest read and
  checked, over S3 too) to the first batch in hand;
- samples/s and frames/s: the samples and their unpadded frames (``~pad_mask``) of the
  --batches batches after the first, over the time they took;
- requests and bytes (S3 cells): counted in the server process by a WSGI middleware around
  moto's app (nothing in evav is wrapped): requests by method, and the response body bytes it
  sent. The child asks the server for its counters (a request the counters leave out) just
  before ``Loader(...)``, after the first batch and after the last, so the "start-up" figures
  are those before the first batch (manifest, shard indexes, the first samples; with workers
  also what they read ahead), and the timed ones those of the timed batches (with workers, what
  they read ahead for batches never taken replaces what was read ahead before: a size, not an
  exact figure). Server CPU seconds: the server process's user + system time over the cell.

Cells are taken in turn (for each repeat: each worker count, local then S3), so a busy spell on
a shared machine hits both sources alike; the table gives medians of --repeats and the ratio
S3 / local per worker count. Writes the section ``remote`` of docs/benchmarks.md
(tools.benchlib.write_section) only with --write.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OUT_MD = REPO / "docs" / "benchmarks.md"
DATASETS = REPO.parent / "shared" / "datasets"
BUCKET = "evav-bench"
COUNTS_PATH = "/__evav_bench/counts"  # answered by the middleware, never by moto, not counted
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


# -- the server process ------------------------------------------------------------------------
class Counting:
    """WSGI middleware: requests by method and response body bytes, served at COUNTS_PATH."""

    def __init__(self, app):
        self.app, self.lock = app, threading.Lock()
        self.counts: dict[str, int] = {"bytes": 0}

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") == COUNTS_PATH:
            with self.lock:
                body = json.dumps(self.counts).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        method = environ.get("REQUEST_METHOD", "?")
        with self.lock:
            self.counts[method] = self.counts.get(method, 0) + 1
        return self._count(self.app(environ, start_response))

    def _count(self, chunks):
        try:
            for c in chunks:
                with self.lock:
                    self.counts["bytes"] += len(c)
                yield c
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()


def serve(port: int) -> None:
    """moto's S3 server (as ThreadedMotoServer runs it), behind Counting, until killed."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    app = Counting(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", port, app, True, request_handler=MotoRequestHandler)
    print("ready", flush=True)
    server.serve_forever()


class Server:
    """The server process: start, wait until it answers, CPU seconds, stop."""

    def __init__(self, log: Path):
        from tools.mlflow_server import free_port

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", str(self.port)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, env=env, cwd=REPO)
        deadline = time.monotonic() + 60
        while True:
            try:
                counts(self.endpoint)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    sys.exit(f"the moto server did not start; its log: {log}")
                time.sleep(0.2)

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def counts(endpoint: str) -> dict:
    with urllib.request.urlopen(endpoint + COUNTS_PATH, timeout=10) as r:
        return json.loads(r.read())


def _delta(a: dict, b: dict) -> dict:
    return {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b)}


# -- the measured process ----------------------------------------------------------------------
def child(data: str, workers: int, batches: int, batch_size: int, endpoint: str) -> None:
    """Build the Loader, take its first batch and ``batches`` more; print the figures as JSON."""
    from evav.data import DataConfig, Loader

    remote = data.startswith("s3://")
    cfg = DataConfig(train=[data], num_workers=workers)
    c0 = counts(endpoint) if remote else {}
    t0 = time.perf_counter()
    ld = Loader(cfg, split="train", rank=0, world_size=1, batch_size=batch_size, seed=0)
    it = iter(ld)
    next(it)
    t1 = time.perf_counter()
    c1 = counts(endpoint) if remote else {}
    samples = frames = 0
    t2 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        samples += len(b["key"])
        frames += int((~b["pad_mask"]).sum())
    t3 = time.perf_counter()
    c2 = counts(endpoint) if remote else {}
    skipped = ld.stats().get("data/skipped", 0)
    del it
    out = {
        "first_s": t1 - t0,
        "timed_s": t3 - t2,
        "samples": samples,
        "frames": frames,
        "skipped": skipped,
        "start": _delta(c0, c1),
        "timed": _delta(c1, c2),
    }
    print(json.dumps(out), flush=True)


def run_child(data: str, workers: int, batches: int, batch_size: int, endpoint: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", data, str(workers)]
    cmd += [str(batches), str(batch_size), endpoint]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the dataset -------------------------------------------------------------------------------
def build(datasets: Path, out: Path, limit: int, shard_samples: int) -> tuple[Path, str]:
    """FSDD from ``datasets`` (or synthetic where it is absent) into ``out``: (folder, how)."""
    from evav.cli import main as evav_main

    common = ["--shard-samples", str(shard_samples), "--workers", "2"]
    if (datasets / "fsdd" / "recordings").is_dir():
        d = out / "fsdd"
        args = ["preprocess", "fsdd", "--src", str(datasets / "fsdd"), "--out", str(d)]
        args += ["--limit", str(limit), *common]
        how = f"`evav preprocess fsdd --limit {limit} --shard-samples {shard_samples}`"
    else:  # 5 tasks
        d = out / "synthetic"
        per_task = max(1, limit // 5)
        args = ["preprocess", "synthetic", "--out", str(d), *common]
        args += [f"train_per_task={per_task}", "val_per_task=2"]
        how = (
            f"`evav preprocess synthetic train_per_task={per_task} "
            f"--shard-samples {shard_samples}` ({datasets} is absent)"
        )
    assert evav_main(args) == 0
    return d, how


def upload(local: Path, endpoint: str) -> str:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    fs.put(str(local), f"{BUCKET}/{local.name}", recursive=True)
    return f"s3://{BUCKET}/{local.name}"


# -- the table ---------------------------------------------------------------------------------
def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _med(xs) -> float:
    return statistics.median(xs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="0,2", help="data.num_workers values, listed")
    ap.add_argument("--batches", type=int, default=40, help="timed batches after the first")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="processes per cell (medians)")
    ap.add_argument("--datasets", type=Path, default=DATASETS, help="the real datasets folder")
    ap.add_argument("--limit", type=int, default=400, help="train inputs to build")
    ap.add_argument("--shard-samples", type=int, default=16, help="inputs per shard")
    ap.add_argument("--data", type=Path, help="use the dataset in DIR (from --keep), build none")
    ap.add_argument("--keep", type=Path, help="build the dataset into DIR and keep it")
    ap.add_argument("--write", action="store_true", help=f"write the section to {OUT_MD.name}")
    ap.add_argument("--out", type=Path, default=OUT_MD)
    a = ap.parse_args(argv)
    from evav.manifest import load_manifest
    from tools.benchlib import machine, write_section

    t_start = time.monotonic()
    load_start = uptime()
    workers = [int(w) for w in a.workers.split(",")]
    for k, v in CREDENTIALS.items():  # the children and the upload inherit them
        os.environ[k] = v
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    with tempfile.TemporaryDirectory() as tmp:
        if a.data:
            local, how = a.data.resolve(), f"the dataset in `{a.data}`"
        else:
            local, how = build(a.datasets, a.keep or Path(tmp), a.limit, a.shard_samples)
        m = load_manifest(local)
        tr = m.splits["train"]
        n_all = sum(len(s.shards) for s in m.splits.values())
        shard_kib = sum((local / sh.path).stat().st_size for sh in tr.shards) / len(tr.shards)
        server = Server(Path(tmp) / "moto.log")
        try:
            os.environ["AWS_ENDPOINT_URL_S3"] = server.endpoint
            t_up = time.perf_counter()
            url = upload(local, server.endpoint)
            t_up = time.perf_counter() - t_up
            print(f"uploaded {local} to {url} in {t_up:.1f} s", flush=True)
            sources = {"local": str(local), "s3": url}
            runs: dict[tuple[int, str], list[dict]] = {(w, s): [] for w in workers for s in sources}
            for rep in range(a.repeats):  # in turn: a busy spell hits both sources alike
                for w in workers:
                    for s, data in sources.items():
                        cpu0 = server.cpu_s()
                        r = run_child(data, w, a.batches, a.batch_size, server.endpoint)
                        r["server_cpu_s"] = server.cpu_s() - cpu0
                        runs[(w, s)].append(r)
                        print(
                            f"repeat {rep} workers {w} {s}: first batch {r['first_s']:.2f} s, "
                            f"{r['samples'] / r['timed_s']:.0f} samples/s, "
                            f"{r['frames'] / r['timed_s']:.0f} frames/s, "
                            f"timed {r['timed']}, start {r['start']}, "
                            f"server CPU {r['server_cpu_s']:.2f} s",
                            flush=True,
                        )
        finally:
            server.stop()
    load_end = uptime()
    minutes = (time.monotonic() - t_start) / 60

    rows, ratios = [], []
    for w in workers:
        med = {}
        for s in sources:
            rs = runs[(w, s)]
            med[s] = {
                "sps": _med(r["samples"] / r["timed_s"] for r in rs),
                "fps": _med(r["frames"] / r["timed_s"] for r in rs),
                "first": _med(r["first_s"] for r in rs),
                "cpu": _med(r["server_cpu_s"] for r in rs),
                "skipped": max(r["skipped"] for r in rs),
            }
            if s == "s3":
                n = _med(r["samples"] for r in rs)
                med[s]["get_start"] = _med(r["start"].get("GET", 0) for r in rs)
                med[s]["head_start"] = _med(r["start"].get("HEAD", 0) for r in rs)
                med[s]["kib_start"] = _med(r["start"].get("bytes", 0) for r in rs) / 2**10
                med[s]["get_per"] = _med(r["timed"].get("GET", 0) for r in rs) / n
                med[s]["head_timed"] = _med(r["timed"].get("HEAD", 0) for r in rs)
                med[s]["kib_per"] = _med(r["timed"].get("bytes", 0) for r in rs) / n / 2**10
            x = med[s]
            req = (
                f"{x['get_start']:.0f} / {x['head_start']:.0f} / {x['kib_start']:.0f} "
                f"| {x['get_per']:.2f} / {x['head_timed']:.0f} / {x['kib_per']:.1f}"
                if s == "s3"
                else "- | -"
            )
            rows.append(
                f"| {w} | {s} | {x['first']:.2f} | {x['sps']:,.0f} | {x['fps']:,.0f} "
                f"| {req} | {x['cpu']:.2f} |"
            )
        lo, hi = med["local"], med["s3"]
        ratios.append(
            f"| {w} | {hi['sps'] / lo['sps']:.2f} | {hi['fps'] / lo['fps']:.2f} "
            f"| {hi['first'] / lo['first']:.2f} |"
        )
        if lo["skipped"] or hi["skipped"]:
            print(f"WARNING: skipped samples (workers {w}): {lo['skipped']}, {hi['skipped']}")
    print("\n".join(rows + ratios), flush=True)

    cmd = ".venv/bin/python tools/bench_remote.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    md = f"""## Loader throughput: local disk vs S3 on loopback (issue 18) (`tools/bench_remote.py`)

{machine()}; {len(os.sched_getaffinity(0))} cores usable. Load: `{load_start}` at the start,
`{load_end}` at the end. Command: `{cmd.strip()}` ({minutes:.1f} min in all).

Dataset: {how}: {tr.samples} train clips ({tr.frames / max(1, tr.samples):.1f} frames on
average, 64x64, FFV1) in {len(tr.shards)} train shards ({n_all} with the other splits) of
{shard_kib:.0f} KiB on average, each with its index. The same folder is read from local disk
(just written: warm page cache) and, uploaded as built, from `s3://{BUCKET}/{local.name}` on
moto's S3 server (moto 5, in a process of its own on 127.0.0.1; objects in memory), through
fsspec/s3fs (`evav/data/remote.py`: one ranged GET per sample once the shard's index is read).
Each cell is a fresh process building the Loader as `evav/train.py` does (split train, rank 0
of 1, batch {a.batch_size}, seed 0, `DataConfig` defaults but `data.num_workers`: window 4,
clip_frames 16, pad_to longest, PyAV), taking the first batch, then {a.batches} more: median of
{a.repeats} processes per cell, cells taken in turn (local, S3, local, S3, ...).

- first batch s: from just before `Loader(...)` (imports excluded; the manifest read and
  checked) to the first batch in hand. samples/s, frames/s (decoded, unpadded): the
  {a.batches} batches after the first, over the time they took.
- requests (S3): counted in the server process by a WSGI middleware around moto's app (nothing
  in evav wrapped). "before the first batch": GETs / HEADs / KiB of response bodies sent from
  just before `Loader(...)` to the first batch in hand (the manifest, shard indexes, the first
  samples; with workers, also what they read ahead). "timed": GETs per sample taken, HEADs, KiB
  per sample, over the timed batches (with workers, the reads ahead shift what is counted: a
  size, not an exact figure). Server CPU s: the moto process's user + system CPU time over the
  whole cell (it shares the {len(os.sched_getaffinity(0))} cores with the loader and its workers).

| data.num_workers | source | first batch s | samples/s | frames/s | before the first batch: GETs / HEADs / KiB | timed: GETs per sample / HEADs / KiB per sample | server CPU s |
|---:|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

S3 / local (medians; below 1: S3 slower; first batch: above 1: S3 later):

| data.num_workers | samples/s | frames/s | first batch s |
|---:|---:|---:|---:|
{chr(10).join(ratios)}

Reading: the server is on loopback, so there is no network latency or bandwidth limit in these
figures: the ratio is the cost of going through fsspec/s3fs and an HTTP server per request (a
signed request, its round trip through s3fs's event loop, moto's handling, here on the same
cores as the loader), not a network figure. A real store adds its per-request latency (a few ms
to tens of ms per GET, first byte) to every sample read, which workers can hide only as far as
they keep enough requests in flight; read these as the floor of what S3 costs the loader.
"""
    print(md)
    if a.write:
        write_section("remote", md, a.out)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    elif len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]))
    else:
        sys.exit(main())
