"""A local MLflow tracking server on loopback, for trying evav's tracking the way a cluster does.

    .venv/bin/python tools/mlflow_server.py --dir runs/mlflow --port 5000
    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000

Runs in the foreground until interrupted. The store is SQLite plus a local artifact folder
under --dir. Tests use ``start_server`` to run a real server on a free port.
"""

from __future__ import annotations

import argparse
import os
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
    stop_server(proc)
    raise RuntimeError(f"mlflow server on {uri} did not answer within {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dir", default="runs/mlflow", help="store folder (SQLite db + artifacts)")
    ap.add_argument("--port", type=int, default=5000)
    args = ap.parse_args()
    proc, uri = start_server(Path(args.dir), args.port)
    print(
        f"MLflow server at {uri} (store {args.dir}); export MLFLOW_TRACKING_URI={uri}; Ctrl-C stops it"
    )
    try:
        proc.wait()
    except KeyboardInterrupt:
        stop_server(proc)


if __name__ == "__main__":
    main()
