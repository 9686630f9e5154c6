"""MetricsLogger against a real MLflow store (SQLite): run status, resume, params, images.

The training tests (tests/test_train.py) check the same behaviour through `evav train`; these
check the logger's own rules quickly and one at a time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evav.metrics import MetricsConfig, MetricsLogger, read_metrics


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # create the schema once
    return uri


def client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def logger(run_dir, uri, params=None, **kw) -> MetricsLogger:
    return MetricsLogger(
        run_dir, MetricsConfig(tracking_uri=uri, close_timeout_s=60), params=params or {}, **kw
    )


def history(uri, run_id, key="train/loss"):
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, key))


def test_killed_run_resumes_in_the_same_run_and_keeps_its_params(uri, tmp_path, caplog):
    first = logger(tmp_path, uri, {"lr": 0.001, "model": {"depth": 4}})
    first.log({"train/loss": 1.0}, step=1)
    first.log({"train/loss": 0.9}, step=2)
    first.close("KILLED")
    run_id = (tmp_path / "mlflow_run_id").read_text().strip()
    run = client(uri).get_run(run_id)
    assert run.info.status == "KILLED"
    assert history(uri, run_id) == [(1, 1.0), (2, 0.9)]

    caplog.set_level(logging.WARNING, "evav.metrics")
    again = logger(tmp_path, uri, {"lr": 0.002, "model": {"depth": 4}, "new_key": "x"})
    again.log({"train/loss": 0.8}, step=3)
    again.close()
    run = client(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert history(uri, run_id) == [(1, 1.0), (2, 0.9), (3, 0.8)]
    assert run.data.params == {"lr": "0.001", "model.depth": "4", "new_key": "x"}
    assert run.data.tags["changed_param.lr"] == "0.002"
    assert "params are immutable" in caplog.text and "lr" in caplog.text
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_failed_status_and_close_is_idempotent(uri, tmp_path):
    m = logger(tmp_path, uri)
    m.log({"train/loss": 1.0}, step=1)
    with pytest.raises(ValueError, match="FINISHED, FAILED or KILLED"):
        m.close("DONE")
    m.close("FAILED")
    m.close("FINISHED")  # a second close (the trainer's exit hook) changes nothing
    run_id = (tmp_path / "mlflow_run_id").read_text().strip()
    assert client(uri).get_run(run_id).info.status == "FAILED"


def test_run_id_missing_from_the_store_starts_a_new_run(uri, tmp_path, caplog):
    caplog.set_level(logging.WARNING, "evav.metrics")
    m = logger(tmp_path, uri, run_id="0123456789abcdef0123456789abcdef")  # e.g. another server
    m.log({"train/loss": 1.0}, step=1)
    m.close()
    run_id = (tmp_path / "mlflow_run_id").read_text().strip()
    assert run_id != "0123456789abcdef0123456789abcdef"
    assert "is not in" in caplog.text and "starting a new run" in caplog.text
    assert history(uri, run_id) == [(1, 1.0)]


def test_log_image_writes_a_png_and_an_artifact(uri, tmp_path):
    m = logger(tmp_path, uri)
    sheet = np.zeros((10, 20, 3), np.uint8)
    sheet[:, 10:] = (255, 0, 0)
    path = m.log_image("pred_vs_true", sheet, step=7)
    m.close()
    assert path == tmp_path / "images" / "pred_vs_true" / "step_00000007.png"
    np.testing.assert_array_equal(np.asarray(Image.open(path)), sheet)
    run_id = (tmp_path / "mlflow_run_id").read_text().strip()
    files = [f.path for f in client(uri).list_artifacts(run_id, "images/pred_vs_true")]
    assert files == ["images/pred_vs_true/step_00000007.png"]
    # a SQLite store keeps artifacts beside its database, not in ./mlruns of the current directory
    db_dir = Path(uri.removeprefix("sqlite:///")).parent
    stored = db_dir / "mlartifacts" / "evav" / run_id / "artifacts" / files[0]
    np.testing.assert_array_equal(np.asarray(Image.open(stored)), sheet)


def test_disabled_logger_writes_only_jsonl(tmp_path):
    m = MetricsLogger(tmp_path, MetricsConfig(enabled=False))
    m.log({"train/loss": 0.5, "train/nan": float("nan")}, step=1)
    m.close("KILLED")
    assert not (tmp_path / "mlflow_run_id").exists()
    assert [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(tmp_path)] == [
        {"step": 1, "train/loss": 0.5, "train/nan": None, "nonfinite": {"train/nan": "nan"}}
    ]


def test_wait_run_id_names_the_run_before_any_metric_was_sent(tmp_path):
    """A checkpoint saved in the first second of a run records its MLflow run: wait_run_id waits
    for the background thread's first contact (here a new SQLite store, whose schema takes
    seconds to create) instead of returning None."""
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    m = logger(tmp_path / "run", uri)
    run_id = m.wait_run_id()
    assert run_id is not None and run_id == (tmp_path / "run" / "mlflow_run_id").read_text().strip()
    assert client(uri).get_run(run_id).info.status == "RUNNING"
    m.close()


def test_wait_run_id_gives_up_on_an_unreachable_server(tmp_path):
    m = MetricsLogger(tmp_path, MetricsConfig(tracking_uri="http://127.0.0.1:9", close_timeout_s=3))
    assert m.wait_run_id() is None
    m.close()


def test_credentials_in_the_uri_are_used_but_never_shown(tmp_path, caplog, monkeypatch):
    """One warning at the start, and the "unreachable" one (which quotes MLflow's error, naming
    the URL), show the URI without user:password@ and without the token parameter."""
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false")  # restored afterwards
    caplog.set_level(logging.WARNING, "evav.metrics")
    uri = "http://evav:SeCrEt123@127.0.0.1:9/?access_token=SeCrEt123&x=1"  # port 9: refused
    m = MetricsLogger(tmp_path, MetricsConfig(tracking_uri=uri, close_timeout_s=3))
    m.log({"train/loss": 1.0}, step=1)
    assert m.wait_run_id() is None
    m.close()
    assert m.tracking_uri == uri and m.shown_uri == "http://127.0.0.1:9/?x=1"
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings[0].startswith(
        "MLflow tracking URI http://127.0.0.1:9/?x=1 (from metrics.tracking_uri) carries "
        "credentials: they are used to connect but never shown or stored"
    )
    assert sum("carries credentials" in w for w in warnings) == 1
    unreachable = [w for w in warnings if "unreachable" in w]
    assert unreachable and unreachable[0].startswith(
        "MLflow at http://127.0.0.1:9/?x=1 unreachable (MlflowException: API request to "
        "http://127.0.0.1:9/?x=1/api/2.0/mlflow/"
    ), unreachable
    assert "secret123" not in caplog.text.lower()
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"  # MLflow's own line


def test_a_uri_without_credentials_gets_no_warning(uri, tmp_path, caplog):
    caplog.set_level(logging.WARNING, "evav.metrics")
    m = logger(tmp_path, uri)
    m.close()
    assert m.shown_uri == uri and "credentials" not in caplog.text
