"""Credentials in a tracking URI are used to connect and never shown or stored (evav.metrics).

``redact_uri`` on many URI forms; then real training runs whose tracking URI (in the config, or
in ``$MLFLOW_TRACKING_URI``) holds a password and a token: against a closed port (the
"unreachable" warning path, which prints MLflow's own error naming the URL) and against a real
MLflow server. Afterwards no byte of the secret is in any file of the run directory or of the
server's store (SQLite db, artifacts, its log), nor in what the trainer printed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from evav.config import dump_yaml, load_config
from evav.metrics import has_credentials, redact_text, redact_uri, redacted_config, uri_secrets
from evav.train import TrainConfig
from tests.test_train import losses, run_train, synthetic  # noqa: F401 (a fixture)

SECRET = "SeCrEt123"


@pytest.mark.parametrize(
    "uri, shown",
    [
        ("http://user:SeCrEt123@host:5000", "http://host:5000"),
        ("https://user:SeCrEt123@mlflow.example.org/prefix/", "https://mlflow.example.org/prefix/"),
        ("http://:SeCrEt123@host", "http://host"),  # a password without a user
        ("https://SeCrEt123@host:443/x", "https://host:443/x"),  # a token as the user name
        ("http://u:p@ss:SeCrEt123@host:5000", "http://host:5000"),  # @ and : in the password
        ("http://u:Se/Cr?Et123@host:5000/p", "http://host:5000/p"),  # unencoded / and ?
        ("http://host:5000/?token=SeCrEt123&experiment=3", "http://host:5000/?experiment=3"),
        ("http://host/?a=1&ACCESS_TOKEN=SeCrEt123;Password=x&b=2", "http://host/?a=1&b=2"),
        ("https://h/p?X-Amz-Signature=S&X-Amz-Credential=C&X-Amz-Security-Token=T", "https://h/p"),
        ("http://h?api_key=1&key=2&sig=3&signature=4&client_secret=5&keep=6", "http://h?keep=6"),
        ("http://h/#access_token=SeCrEt123&state=1", "http://h/#state=1"),
        ("postgresql://mlflow:SeCrEt123@db:5432/mlflow", "postgresql://db:5432/mlflow"),
        ("http://[::1]:5000/?token=SeCrEt123", "http://[::1]:5000/"),
        # nothing to remove: byte for byte the same
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("http://h:5000/#/experiments/1?x=1", "http://h:5000/#/experiments/1?x=1"),
        ("sqlite:////abs/runs/mlflow.db", "sqlite:////abs/runs/mlflow.db"),
        ("sqlite:///runs/mlflow.db", "sqlite:///runs/mlflow.db"),
        ("file:///tmp/mlruns", "file:///tmp/mlruns"),
        ("databricks", "databricks"),
        ("./mlruns", "./mlruns"),
        ("http://host:5000/users/@me", "http://host:5000/users/@me"),  # an @ in the path
    ],
)
def test_redact_uri(uri, shown):
    assert redact_uri(uri) == shown
    assert has_credentials(uri) == (uri != shown)
    assert SECRET not in redact_uri(uri)
    assert redact_uri(shown) == shown  # redacting twice changes nothing


def test_redact_text_removes_secrets_wherever_a_message_has_them():
    uri = "http://user:SeCrEt123@127.0.0.1:9/?token=tok%2Fen&x=1"
    secrets = uri_secrets(uri)
    assert {"SeCrEt123", "tok%2Fen", "tok/en"} <= set(secrets)
    message = (  # what MLflow and urllib3 raise: the whole URL, then its path and query alone
        "API request to http://user:SeCrEt123@127.0.0.1:9/?token=tok%2Fen&x=1/api/2.0/mlflow/"
        "runs/create failed with exception HTTPConnectionPool(host='127.0.0.1', port=9): Max "
        "retries exceeded with url: /?token=tok%2Fen&x=1/api/2.0 (auth SeCrEt123, tok/en)"
    )
    out = redact_text(message, secrets)
    assert "SeCrEt123" not in out and "tok%2Fen" not in out and "tok/en" not in out
    assert "API request to http://127.0.0.1:9/?x=1/api/2.0/mlflow/runs/create failed" in out
    assert "HTTPConnectionPool(host='127.0.0.1', port=9)" in out


def test_redacted_config_changes_only_the_credentials(tmp_path):
    uri = "http://user:SeCrEt123@mlflow:5000/?token=SeCrEt123&x=1"
    cfg = load_config(
        TrainConfig, None, [f"metrics.tracking_uri={uri}", "steps=7", "data.train=[a, b]"]
    )
    public = redacted_config(cfg)
    assert public["metrics"]["tracking_uri"] == "http://mlflow:5000/?x=1"
    public["metrics"]["tracking_uri"] = uri
    assert public == yaml.safe_load(dump_yaml(cfg))  # everything else as it was
    assert cfg.metrics.tracking_uri == uri  # the real one stays in memory, to connect with
    (tmp_path / "c.yaml").write_text(dump_yaml(redacted_config(cfg)))
    assert SECRET not in (tmp_path / "c.yaml").read_text()
    back = load_config(TrainConfig, tmp_path / "c.yaml", [])
    assert back.metrics.tracking_uri == "http://mlflow:5000/?x=1" and back.steps == 7


def files_with(secret: str, *roots: Path) -> list[str]:
    """Every file under ``roots`` whose bytes hold ``secret`` (any letter case)."""
    needle = secret.lower().encode()
    hits, seen = [], 0
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file() and not p.is_symlink():
                seen += 1
                if needle in p.read_bytes().lower():
                    hits.append(str(p))
    assert seen, f"no files under {roots}"
    return hits


def train_with(run_dir, data, *extra, env=None) -> subprocess.CompletedProcess:
    done = run_train(
        run_dir,
        data,
        "steps=2",
        "metrics.enabled=true",
        "metrics.close_timeout_s=3",
        *extra,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(losses(run_dir)) == [1, 2]
    return done


@pytest.mark.parametrize("where", ["config", "environment"])
def test_unreachable_server_warning_and_run_files_hold_no_secret(synthetic, tmp_path, where):  # noqa: F811
    uri = f"http://user:{SECRET}@127.0.0.1:9/?token={SECRET}&x=1"  # port 9: refused
    if where == "config":
        done = train_with(tmp_path / "run", synthetic, f"metrics.tracking_uri={uri}")
    else:
        done = train_with(tmp_path / "run", synthetic, env={"MLFLOW_TRACKING_URI": uri})
    out = done.stdout + done.stderr
    assert "MLflow at http://127.0.0.1:9/?x=1 unreachable (MlflowException: API request" in out
    source = "metrics.tracking_uri" if where == "config" else "$MLFLOW_TRACKING_URI"
    assert out.count("carries credentials") == 1, out[-3000:]
    assert f"MLflow tracking URI http://127.0.0.1:9/?x=1 (from {source}) carries credentials" in out
    assert SECRET.lower() not in out.lower(), out[-3000:]
    assert files_with(SECRET, tmp_path / "run") == []
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    expected = "http://127.0.0.1:9/?x=1" if where == "config" else None
    assert config["metrics"]["tracking_uri"] == expected
    saved = tmp_path / "run" / "checkpoints" / "step_00000002" / "config.yaml"
    assert yaml.safe_load(saved.read_text()) == config


def test_real_mlflow_server_connects_and_stores_no_secret(synthetic, tmp_path):  # noqa: F811
    """An MLflow server without auth ignores the credentials, so the run must still be made,
    with the redacted URI as its param and the redacted config as its artifact."""
    from mlflow.tracking import MlflowClient

    from tools.mlflow_server import start_server, stop_server

    (tmp_path / "srv").mkdir()
    proc, plain = start_server(tmp_path / "srv" / "store")
    uri = plain.replace("http://", f"http://evav:{SECRET}@")
    try:
        done = train_with(tmp_path / "run", synthetic, f"metrics.tracking_uri={uri}")
        client = MlflowClient(plain)
        run = client.get_run((tmp_path / "run" / "mlflow_run_id").read_text().strip())
        assert run.info.status == "FINISHED"
        hist = client.get_metric_history(run.info.run_id, "train/loss")
        assert sorted(m.step for m in hist) == [1, 2]
        assert run.data.params["metrics.tracking_uri"] == plain
        assert all(SECRET.lower() not in v.lower() for v in run.data.params.values())
        assert all(SECRET.lower() not in v.lower() for v in run.data.tags.values())
        local = client.download_artifacts(run.info.run_id, "config/config.yaml", str(tmp_path))
        assert yaml.safe_load(Path(local).read_text())["metrics"]["tracking_uri"] == plain
    finally:
        stop_server(proc)
    out = done.stdout + done.stderr
    assert out.count("carries credentials") == 1 and "unreachable" not in out, out[-3000:]
    assert SECRET.lower() not in out.lower(), out[-3000:]
    # the store's SQLite db (and any -wal/-journal), its artifacts, the server's log, the run
    assert any(p.suffix == ".db" for p in (tmp_path / "srv").rglob("*"))
    assert files_with(SECRET, tmp_path / "run", tmp_path / "srv", tmp_path / "config") == []
