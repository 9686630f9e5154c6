"""Metrics: one small logger interface; a local ``metrics.jsonl`` always, MLflow when reachable.

    log = MetricsLogger(run_dir, MetricsConfig(), params=resolved_config_dict)
    log.log({"train/loss": 0.31, "speed/frames_per_s": 812.0}, step=120)
    log.close()

Keys are namespaced (``train/loss``, ``val/loss/fsdd``, ``speed/mfu``, ``data/wait_s``).

The jsonl file is the record of truth: every call is appended and flushed before ``log``
returns. MLflow is fed from a background thread, so a slow or dead tracking server never stalls
training: batches that fail stay queued and are retried with backoff, and are sent when the
server comes back (or dropped at ``close`` after ``close_timeout_s``, with a warning naming how
many). The MLflow run id is kept in ``RUN_DIR/mlflow_run_id``: a resumed or requeued job
continues the same run, and one created while the server was down is created when it returns.

Without ``tracking_uri`` (and no ``MLFLOW_TRACKING_URI``), runs go to a SQLite store in the run
root (``sqlite:///RUN_ROOT/mlflow.db``): the embedded default, no server needed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class MetricsConfig:
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else SQLite in the run root
    experiment: str = "evav"
    enabled: bool = True  # False: metrics.jsonl only
    close_timeout_s: float = 20.0


def default_tracking_uri(run_dir: Path) -> str:
    """``$MLFLOW_TRACKING_URI`` or a SQLite store beside the run directory."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(run_dir).resolve().parent / 'mlflow.db'}"


class MetricsLogger:
    """Rank-0 metrics sink: jsonl always, MLflow in the background."""

    def __init__(self, run_dir: str | Path, cfg: MetricsConfig | None = None,
                 params: dict[str, Any] | None = None, run_name: str | None = None):
        self.cfg = cfg or MetricsConfig()
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self._queue: queue.Queue = queue.Queue()
        self._thread = None
        self.run_id: str | None = _read(self.run_dir / "mlflow_run_id")
        self._run_name = run_name or self.run_dir.name
        self._params = _flatten(params or {})
        if self.cfg.enabled:
            self.tracking_uri = self.cfg.tracking_uri or default_tracking_uri(self.run_dir)
            self._thread = threading.Thread(target=self._sender, name="mlflow-sender", daemon=True)
            self._thread.start()

    # -- public ----------------------------------------------------------------------------
    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record metrics for ``step``: appended to metrics.jsonl now, to MLflow soon."""
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        record = {"step": int(step), "time": time.time(), **clean}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._thread is not None:
            self._queue.put(("metrics", record))

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._thread is not None:
            self._queue.put(("tags", dict(tags)))

    def log_artifact(self, path: str | Path) -> None:
        if self._thread is not None:
            self._queue.put(("artifact", str(path)))

    def close(self) -> None:
        """Flush what MLflow has not yet taken (up to ``close_timeout_s``), then stop."""
        if self._thread is not None:
            self._queue.put(("close", None))
            self._thread.join(self.cfg.close_timeout_s)
            if self._thread.is_alive():
                log.warning("MLflow: gave up sending after %.0f s; metrics.jsonl is complete",
                            self.cfg.close_timeout_s)
            self._thread = None
        self._jsonl.close()

    # -- background sender -------------------------------------------------------------------
    def _sender(self) -> None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        pending: list[tuple[str, Any]] = []
        closing, backoff, next_try, warned = False, 1.0, 0.0, False
        while not (closing and not pending):
            try:
                item = self._queue.get(timeout=1.0)
                while True:  # take everything queued
                    if item[0] == "close":
                        closing = True
                    else:
                        pending.append(item)
                    item = self._queue.get_nowait()
            except queue.Empty:
                pass
            if not pending or time.monotonic() < next_try:
                continue
            try:
                self._send(pending)
                pending, backoff = [], 1.0
                if warned:
                    log.warning("MLflow: reachable again at %s", self.tracking_uri)
                    warned = False
            except Exception as e:  # noqa: BLE001 - any failure: keep the batch, retry later
                if not warned:
                    log.warning("MLflow at %s unreachable (%s: %s); retrying in the background, "
                                "metrics.jsonl keeps everything", self.tracking_uri,
                                type(e).__name__, str(e)[:200])
                    warned = True
                next_try = time.monotonic() + (1.0 if closing else backoff)
                backoff = min(backoff * 2, 30.0)

    def _client(self):
        from mlflow.tracking import MlflowClient

        if getattr(self, "_mlflow", None) is None:
            self._mlflow = MlflowClient(self.tracking_uri)
        return self._mlflow

    def _ensure_run(self) -> str:
        if self.run_id is None:
            client = self._client()
            exp = client.get_experiment_by_name(self.cfg.experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(self.cfg.experiment)
            run = client.create_run(exp_id, run_name=self._run_name)
            self.run_id = run.info.run_id
            _write_atomic(self.run_dir / "mlflow_run_id", self.run_id)
            from mlflow.entities import Param

            params = [Param(k, str(v)[:6000]) for k, v in self._params.items()]
            for i in range(0, len(params), 100):
                client.log_batch(self.run_id, params=params[i : i + 100])
        return self.run_id

    def _send(self, items: list[tuple[str, Any]]) -> None:
        from mlflow.entities import Metric, RunTag

        run_id = self._ensure_run()
        client = self._client()
        metrics = [Metric(k, v, int(r["time"] * 1000), r["step"])
                   for kind, r in items if kind == "metrics"
                   for k, v in r.items() if k not in ("step", "time")]
        for i in range(0, len(metrics), 900):
            client.log_batch(run_id, metrics=metrics[i : i + 900])
        for kind, payload in items:
            if kind == "tags":
                client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in payload.items()])
            elif kind == "artifact":
                client.log_artifact(run_id, payload)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of ``RUN_DIR/metrics.jsonl`` (a torn last line from a kill is skipped)."""
    out = []
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
