"""A local MLflow tracking server on loopback, for trying evav's tracking the way a cluster does.

    .venv/bin/python tools/mlflow_server.py --dir runs/mlflow --port 5000
    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000

Runs in the foreground until interrupted: SIGTERM, SIGINT (Ctrl-C) or SIGHUP stop the server's
whole process group (``mlflow server`` and its workers run in a session of their own), then this
wrapper exits. The store is SQLite plus a local artifact folder under --dir. Tests use
``start_server`` to run a real server on a free port.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(store: Path, port: int) -> list[str]:
    store.mkdir(parents=True, exist_ok=True)
    mlflow = Path(sys.executable).with_name("mlflow")
    return [
        str(mlflow) if mlflow.exists() else "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{store.resolve() / 'mlflow.db'}",
        "--artifacts-destination",
        str((store / "artifacts").resolve()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def start_server(store: Path, port: int | None = None, timeout_s: float = 120.0):
    """Start a server; return (process, uri) once it answers /health. Caller terminates it."""
    port = port or free_port()
    log = (
        open(store.parent / f"mlflow-server-{port}.log", "ab")
        if store.parent.exists()
        else subprocess.DEVNULL
    )
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        server_command(store, port),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {proc.returncode}; see its log in {store.parent}"
                )
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return proc, uri
            except OSError:
                time.sleep(0.5)
    except BaseException:  # a signal (or anything) while it starts: no server left behind
        stop_server(proc)
        raise
    stop_server(proc)
    raise RuntimeError(f"mlflow server on {uri} did not answer within {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM the server's process group (it leads one: ``start_new_session``), wait for the
    server and its workers to go, SIGKILL the group after ``timeout_s``."""
    pgid = proc.pid
    _killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pass
    while group_members(pgid) and time.monotonic() < deadline:  # its workers, if they linger
        time.sleep(0.1)
    if proc.poll() is None or group_members(pgid):
        _killpg(pgid, signal.SIGKILL)
    proc.wait()


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``, from /proc (Linux); where
    /proc is missing, whether the group answers a signal 0."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").is_file():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    out = []
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(d.name))
    return sorted(out)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dir", default="runs/mlflow", help="store folder (SQLite db + artifacts)")
    ap.add_argument("--port", type=int, default=5000)
    args = ap.parse_args()

    def stop(signum, frame):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second signal does not cut the stop short
        raise _Stop(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    try:
        proc, uri = start_server(Path(args.dir), args.port)  # stops what it started on _Stop
    except _Stop as e:
        sys.exit(128 + e.signum)
    print(
        f"MLflow server at {uri} (store {args.dir}, process group {proc.pid}); "
        f"export MLFLOW_TRACKING_URI={uri}; Ctrl-C stops it",
        flush=True,
    )
    try:
        code = proc.wait()
    except _Stop as e:
        stop_server(proc)
        sys.exit(128 + e.signum)
    stop_server(proc)  # the server ended by itself: its workers too
    sys.exit(code)


class _Stop(BaseException):
    """A stop signal, raised in the main thread by the handler."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


if __name__ == "__main__":
    main()
