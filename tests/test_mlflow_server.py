"""tools/mlflow_server.py with a real `mlflow server`: SIGTERM and SIGINT to the wrapper stop the
server's whole process group (it runs in a session of its own, so the signal does not reach it
by itself), the port stops answering, and the wrapper exits."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tools.mlflow_server import free_port, group_members

REPO = Path(__file__).resolve().parents[1]


def answers(uri: str) -> bool:
    try:
        with urllib.request.urlopen(uri + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_stops_the_servers_whole_process_group(tmp_path, sig):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    wrapper = subprocess.Popen(
        [sys.executable, "tools/mlflow_server.py", "--dir", str(tmp_path / "store")]
        + ["--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    pgid = None
    try:
        line = wrapper.stdout.readline()
        m = re.search(r"process group (\d+)\)", line)
        assert m, line + wrapper.stdout.read() if wrapper.poll() is not None else line
        pgid = int(m.group(1))
        assert answers(uri)
        members = group_members(pgid)
        assert pgid in members and wrapper.pid not in members  # the server, in its own group
        assert os.getpgid(wrapper.pid) != pgid

        wrapper.send_signal(sig)
        assert wrapper.wait(60) == 128 + sig
        assert group_members(pgid) == [], f"left running: {group_members(pgid)}"
        assert not answers(uri)
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait()
        if pgid is not None and group_members(pgid):
            os.killpg(pgid, signal.SIGKILL)
