"""Datasets read from URLs (evav/data/remote.py): a real S3-compatible server (moto's, on
loopback) holds a synthetic dataset uploaded as built; a Loader over ``s3://bucket/syn`` gives
exactly what a Loader over the local folder gives, with and without workers; a shard deleted
mid-epoch is a counted bad sample naming its URL; a store that is down, or a dataset that is not
there, is a clear error naming the URL, in seconds."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evav.config import ConfigError
from evav.data import DataConfig, Loader, remote
from evav.data import loader as loader_mod
from evav.data.shards import MAX_MEMBER_BYTES, ShardReader, encode_index
from evav.manifest import load_manifest
from tests.conftest import REPO
from tests.test_hostile_loader import build_synthetic, deadline
from tools.mlflow_server import free_port

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "evav-test"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A moto S3 server on loopback, the environment pointing at it (inherited by DataLoader
    workers), and a synthetic dataset built locally and uploaded whole: (local dir, URL)."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        mp.delenv("AWS_PROFILE", raising=False)
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        local = build_synthetic(
            tmp_path_factory.mktemp("remote") / "syn", render={"height": 32, "width": 32}
        )
        fs = s3()
        fs.mkdir(BUCKET)
        fs.put(str(local), f"{BUCKET}/syn", recursive=True)
        yield local, f"s3://{BUCKET}/syn", f"http://127.0.0.1:{port}/{BUCKET}/syn"
    server.stop()


@pytest.fixture(autouse=True)
def fresh_log_limit(monkeypatch):
    monkeypatch.setattr(loader_mod, "_bad_logged", 0)


def s3():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def loader(d, num_workers=0, batch_size=4, **kw) -> Loader:
    cfg = DataConfig(train=[str(d)], num_workers=num_workers, clip_frames=8)
    return Loader(cfg, batch_size=batch_size, infinite=False, **kw)


def keys(ld: Loader) -> list[str]:
    with deadline(120):
        return [k for b in ld for k in b["key"]]


def test_is_url():
    assert remote.is_url("s3://b/x") and remote.is_url("https://h/x") and remote.is_url("HTTP://h")
    assert not remote.is_url("pipe:curl s3://b/x") and not remote.is_url("/data/s3://x")
    assert not remote.is_url(Path("s3://b"))  # a Path is local (and has lost a slash)


@pytest.mark.parametrize("num_workers", [0, 2], ids=["in-process", "2-workers"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_s3_loader_reads_what_the_local_loader_reads(store, num_workers, split):
    local, url, _ = store
    want = keys(loader(local, split=split))
    ld = loader(url, num_workers, split=split)
    assert ld.names == ["syn"]
    got = keys(ld)
    assert got == want and len(want) == load_manifest(local).splits[split].samples
    assert ld.stats()["data/skipped"] == 0


def test_https_style_url_reads_the_same_through_fsspec_http(store):
    """The same objects over plain HTTP (moto serves path-style GETs with Range): fsspec's
    HTTP filesystem, no S3 client."""
    local, _, http = store
    fs = s3()
    for p in fs.find(f"{BUCKET}/syn"):  # anonymous readers: the objects are public
        fs.chmod(p, "public-read")
    assert keys(loader(http)) == keys(loader(local))


def test_s3_shard_reader_reads_the_same_bytes_and_walks_headers_without_index(store):
    local, url, _ = store
    m = load_manifest(local)
    sh = m.splits["train"].shards[0]
    here, there = ShardReader(), ShardReader()
    for i in range(sh.samples):
        a, b = here.read(str(local / sh.path), i), there.read(f"{url}/{sh.path}", i)
        assert a == b and b[1]
    assert there.index(f"{url}/{sh.path}").from_file
    # without its index (a shard built before indexes): the tar headers, walked remotely
    fs = s3()
    idx = f"{BUCKET}/syn/{sh.path}.idx.json"
    saved = fs.cat_file(idx)
    fs.rm(idx)
    try:
        walker = ShardReader()
        for i in range(sh.samples):
            assert walker.read(f"{url}/{sh.path}", i) == here.read(str(local / sh.path), i)
        assert not walker.index(f"{url}/{sh.path}").from_file
    finally:
        fs.pipe(idx, saved)


def test_forged_remote_index_is_refused_like_a_local_one(store, tmp_path):
    """An index that points outside the object, or at a huge member, never makes the reader ask
    for those bytes: it is refused (tar headers walked) or the member refused before the read."""
    local, url, _ = store
    fs = s3()
    sh = load_manifest(local).splits["train"].shards[1]
    size = (local / sh.path).stat().st_size
    sha = "0" * 64
    key = f"{BUCKET}/forged/{sh.path}"
    fs.pipe(key, (local / sh.path).read_bytes())
    # outside the object: refused by parse_index, the headers walked instead
    fs.pipe(
        key + ".idx.json", encode_index(sh.path, size, sha, [("00000000", {"mp4": (512, size)})])
    )
    r = ShardReader()
    got = r.read(f"s3://{key}", 0)
    assert got is not None and got[1] and not r.index(f"s3://{key}").from_file
    # made for a shard far larger (a member over the limit): refused against the object's size
    big = MAX_MEMBER_BYTES["mp4"] + 4096
    forged = encode_index(sh.path, big, sha, [("00000000", {"mp4": (1024, big - 2048)})])
    fs.pipe(key + ".idx.json", forged)
    r = ShardReader()
    assert r.read(f"s3://{key}", 0) == got and not r.index(f"s3://{key}").from_file


@pytest.mark.parametrize("which", [0, -1], ids=["index-loaded", "not-yet-read"])
def test_shard_deleted_mid_epoch_is_counted_bad_naming_its_url(store, caplog, which):
    """Deleted after its first samples were read (its index loaded: the reads of the rest fail),
    or before any (its index cannot be loaded): each of its samples left is a bad sample."""
    local, url, _ = store
    fs = s3()
    m = load_manifest(local)
    last = m.splits["train"].shards[which]
    want = keys(loader(local, batch_size=2))
    bad = set(want[2 : last.samples]) if which == 0 else set(want[-last.samples :])
    ld = loader(url, batch_size=2)
    it = iter(ld)
    got = list(next(it)["key"])
    saved = fs.cat_file(f"{BUCKET}/syn/{last.path}")
    fs.rm(f"{BUCKET}/syn/{last.path}")
    try:
        with caplog.at_level(logging.WARNING, logger="evav.data.loader"), deadline(120):
            got += [k for b in it for k in b["key"]]
    finally:
        fs.pipe(f"{BUCKET}/syn/{last.path}", saved)
    assert got == [k for k in want if k not in bad]
    stats = ld.stats()
    assert stats["data/skipped"] == len(bad) == stats["data/skipped/read_error"]
    lines = [r.getMessage() for r in caplog.records if "skipped bad sample" in r.getMessage()]
    assert len(lines) == len(bad)
    assert all(f"{url}/{last.path}" in line for line in lines), lines[0]


def test_store_down_is_a_clear_error_naming_the_url_in_seconds(store, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(remote, "_fs", {})
    t0 = time.monotonic()
    with pytest.raises(
        OSError, match=r"s3://nowhere/syn/manifest\.json: cannot read after 3 tries"
    ):
        loader("s3://nowhere/syn")
    assert time.monotonic() - t0 < 15


def test_missing_dataset_names_the_manifest_url(store):
    with pytest.raises(ValueError, match=rf"^s3://{BUCKET}/absent/manifest\.json: no manifest"):
        loader(f"s3://{BUCKET}/absent")
    with pytest.raises(ValueError, match=r"^s3://no-such-bucket/syn/manifest\.json: no manifest"):
        loader("s3://no-such-bucket/syn")


def test_pipe_is_still_refused():
    with pytest.raises(ValueError, match="shell command"):
        loader(f"pipe:aws s3 cp s3://{BUCKET}/syn -")


def test_transient_errors_are_retried_with_backoff_and_permanent_ones_are_not(monkeypatch):
    calls = []
    monkeypatch.setattr(remote, "_filesystem", lambda url: None)
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)

    def flaky(fs):
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return b"ok"

    assert remote._call("s3://b/k", flaky) == b"ok" and len(calls) == 3

    def gone(fs):
        calls.append(1)
        raise FileNotFoundError("NoSuchKey")

    calls.clear()
    with pytest.raises(FileNotFoundError, match=r"^\[Errno 2\] s3://b/k: not found"):
        remote._call("s3://b/k", gone)
    assert len(calls) == 1

    def denied(fs):
        calls.append(1)
        raise PermissionError("AccessDenied")

    calls.clear()
    with pytest.raises(PermissionError, match="s3://b/k: access denied"):
        remote._call("s3://b/k", denied)
    assert len(calls) == 1


def test_s3_without_s3fs_is_one_line_naming_the_extra(tmp_path):
    code = (
        "import sys; sys.modules['s3fs'] = None\n"
        "import importlib.util as u; f = u.find_spec\n"
        "u.find_spec = lambda n, *a: None if n == 's3fs' else f(n, *a)\n"
        "from evav.cli import main; sys.exit(main())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "train", "configs/debug.yaml", "data.train=[s3://b/syn]"]
        + [f"run_dir={tmp_path / 'run'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "evav train: error: data.train entry s3://b/syn needs the s3fs package: "
        "pip install 'evav[remote]'"
    )


def test_loader_refuses_s3_without_s3fs_as_a_config_error(monkeypatch):
    real = remote.importlib.util.find_spec
    monkeypatch.setattr(
        remote.importlib.util, "find_spec", lambda n, *a: None if n == "s3fs" else real(n, *a)
    )
    with pytest.raises(ConfigError, match=r"s3fs package: pip install 'evav\[remote\]'$"):
        loader("s3://b/syn")


def test_store_errors_are_classified_by_status_and_code():
    """What s3fs raises (its OSError, the botocore error as the cause): 5xx and throttling are
    tried again; 404, 403 and bad requests are not."""
    from botocore.exceptions import ClientError, EndpointConnectionError
    from s3fs.errors import translate_boto_error

    def err(code: str, status: int) -> BaseException:
        e = ClientError(
            {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
        )
        return translate_boto_error(e)

    for code, status in [("InternalError", 500), ("SlowDown", 503), ("ServiceUnavailable", 503)]:
        assert remote.transient(err(code, status)), code
    for code, status in [("NoSuchKey", 404), ("NoSuchBucket", 404), ("AccessDenied", 403)]:
        assert not remote.transient(err(code, status)), code
    assert not remote.transient(err("InvalidRange", 416))
    assert remote.transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert remote.transient(TimeoutError())
    denied = remote._error("s3://b/k", err("AccessDenied", 403), 1)
    assert isinstance(denied, PermissionError) and str(denied).startswith("[Errno 13] s3://b/k")


def test_pyproject_declares_the_remote_extra_and_dev_installs_it():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(r.startswith("s3fs") for r in extras["remote"])
    assert any(r.startswith("fsspec") for r in extras["remote"])
    assert "evav[remote]" in extras["dev"] and "evav[remote]" in extras["all"]
    assert any(r.startswith("moto[server]") for r in extras["dev"])
    assert 'pip install -q -e ".[dev]"' in (REPO / "setup.sh").read_text()


@pytest.mark.parametrize("rel", ["train/shard-0.tar?x=1", "train/a#b.tar", "train/%2e%2e/x.tar"])
def test_url_dataset_refuses_shard_paths_a_url_would_read_otherwise(rel):
    from evav.data.shards import shard_paths
    from evav.manifest import ShardInfo

    class Split:
        shards = [ShardInfo(rel, 1, 1, 4096, "0" * 64)]

    with pytest.raises(ValueError, match="only letters, digits"):
        shard_paths("s3://b/syn", Split)
    Split.shards = [ShardInfo("train/ok.tar", 1, 1, 4096, "0" * 64, rel, "0" * 64)]
    with pytest.raises(ValueError, match="only letters, digits"):
        shard_paths("s3://b/syn", Split)
    Split.shards = [ShardInfo("train/ok.tar", 1, 1, 4096, "0" * 64)]
    assert shard_paths("s3://b/syn/", Split) == ["s3://b/syn/train/ok.tar"]
