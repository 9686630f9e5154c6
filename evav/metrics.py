"""Metrics: one small logger interface; a local ``metrics.jsonl`` always, MLflow when reachable.

    log = MetricsLogger(run_dir, MetricsConfig(), params=resolved_config_dict)
    log.log({"train/loss": 0.31, "speed/frames_per_s": 812.0}, step=120)
    log.log_image("pred_vs_true", sheet_HWC, step=120)   # RUN_DIR/images/... + an MLflow artifact
    log.close("FINISHED")          # or "FAILED" (an exception), "KILLED" (preempted, will resume)

Keys are namespaced (``train/loss``, ``val/loss/fsdd``, ``speed/mfu``, ``data/wait_s``).

Non-finite values are kept, never dropped (a divergence must show): in metrics.jsonl, which is
strict JSON, such a value is ``null`` and the record's ``nonfinite`` maps its key to ``"nan"``,
``"inf"`` or ``"-inf"``: ``{"step": 5, "train/grad_norm": null, "nonfinite":
{"train/grad_norm": "inf"}, ...}``. MLflow gets the float itself (its stores, SQLite and the
REST server, take NaN, and inf as +-1.8e308). A value of None is "not measured" and left out.

The jsonl file is the record of truth: every call is appended and flushed before ``log``
returns. MLflow is fed from a background thread, so a slow or dead tracking server never stalls
training: batches that fail stay queued and are retried with backoff, and are sent when the
server comes back (or dropped at ``close`` after ``close_timeout_s``, with a warning naming how
many). The MLflow run id is kept in ``RUN_DIR/mlflow_run_id`` (and in every checkpoint): a
resumed or requeued job continues the same run, and one created while the server was down is
created when it returns.

Run status: ``close`` ends the run FINISHED, FAILED or KILLED after everything queued before it
was sent. MLflow accepts metrics for a terminated run (only a deleted run refuses them), so a
preempted run ends KILLED and the resumed job sets it back to RUNNING and logs on into the same
history. Params are immutable in MLflow (logging a changed value is an error): a resumed job logs
only the keys the run does not have yet, and records each changed value as a tag
``changed_param.KEY`` (with a warning), never as a param.

Credentials. A tracking URI may carry them (``http://user:password@host:5000``,
``?token=...``): they are used to connect, but never printed, logged or stored. Everything that
shows or keeps a URI or a config goes through ``redact_uri`` / ``redact_text`` /
``redacted_config`` (RUN/config.yaml, every checkpoint's config, MLflow params and artifacts,
warnings), and a URI with credentials gets one warning, redacted, at the start. The way to give
them is MLflow's environment (``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` or
``MLFLOW_TRACKING_TOKEN``), not the URI: see docs/operations.md.

Without ``tracking_uri`` (and no ``MLFLOW_TRACKING_URI``), runs go to a SQLite store in the run
root (``sqlite:///RUN_ROOT/mlflow.db``): the embedded default, no server needed. An experiment
this logger creates in a SQLite store keeps its artifacts beside the database
(``RUN_ROOT/mlartifacts/EXPERIMENT``), not in MLflow's default ``./mlruns`` of the current
directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, unquote_plus

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


@dataclass
class MetricsConfig:
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else SQLite in the run root
    experiment: str = "evav"
    enabled: bool = True  # False: metrics.jsonl only
    close_timeout_s: float = 20.0
    image_every: int = 100  # every N steps rank 0 logs predicted vs true frames (0: never)


# -- credentials -----------------------------------------------------------------------------

# A query (or fragment) parameter is a credential when its name, lowercased without separators,
# contains one of these words or ends with one of these suffixes: token, access_token,
# X-Amz-Security-Token, password, client_secret, X-Amz-Credential, X-Amz-Signature, key,
# api_key, sig, pwd, auth, session_id ...
_SECRET_WORDS = ("token", "password", "passwd", "secret", "credential", "signature", "session")
_SECRET_SUFFIXES = ("key", "sig", "pwd", "auth", "authorization")
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]*\]|[^:\[\]]*)(:\d*)?")


def _secret_param(name: str) -> bool:
    n = re.sub(r"[^a-z0-9]", "", unquote_plus(name).lower())
    return any(w in n for w in _SECRET_WORDS) or n.endswith(_SECRET_SUFFIXES)


def _split_uri(uri: str) -> tuple[str, str, str, str, str, str] | None:
    """(scheme, userinfo, host[:port], path, query, fragment) of ``scheme://...``, else None."""
    m = re.fullmatch(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", uri, re.S)
    if not m:
        return None
    scheme, rest = m.groups()
    end = min([i for i in (rest.find(c) for c in "/?#") if i >= 0], default=len(rest))
    authority = rest[:end]
    if "@" in authority:
        userinfo, authority = authority.rsplit("@", 1)
    elif "@" in rest and not _HOST_PORT.fullmatch(authority):
        # a password with an unencoded / ? or #: "user:pa/ss@host" is no valid host:port, so
        # everything up to the last @ is taken as the userinfo (never shown, at worst too much)
        userinfo, rest = rest.rsplit("@", 1)
        end = min([i for i in (rest.find(c) for c in "/?#") if i >= 0], default=len(rest))
        authority = rest[:end]
    else:
        userinfo = ""
    tail = rest[end:]
    tail, _, fragment = tail.partition("#")
    path, _, query = tail.partition("?")
    return scheme, userinfo, authority, path, query, fragment


def _params(text: str) -> list[str]:
    return re.split(r"[&;]", text) if text else []


def redact_uri(uri: str) -> str:
    """``uri`` without credentials: no ``user:password@``, no credential parameters (token,
    password, secret, key, access_token, sig, signature, ...: case-insensitive) in the query or
    fragment; scheme, host, port, path and other parameters stay. Anything else is returned as
    it is (a path, ``sqlite:///...``, ``databricks``)."""
    parts = _split_uri(uri)
    if parts is None:
        return uri
    scheme, userinfo, authority, path, query, fragment = parts
    kept_q = [p for p in _params(query) if not _secret_param(p.split("=", 1)[0])]
    kept_f = [p for p in _params(fragment) if "=" not in p or not _secret_param(p.split("=")[0])]
    if not userinfo and kept_q == _params(query) and kept_f == _params(fragment):
        return uri  # nothing to remove: byte for byte the same
    out = f"{scheme}://{authority}{path}"
    if kept_q:
        out += "?" + "&".join(kept_q)
    if kept_f:
        out += "#" + "&".join(kept_f)
    return out


def has_credentials(uri: str | None) -> bool:
    """Whether ``uri`` carries anything ``redact_uri`` removes."""
    return bool(uri) and redact_uri(uri) != uri


def uri_secrets(uri: str | None) -> list[str]:
    """The secret values in ``uri`` (password, credential parameter values), as written and
    decoded: what a message must never contain, wherever in it they appear."""
    parts = _split_uri(uri or "")
    if parts is None:
        return []
    _, userinfo, _, _, query, fragment = parts
    found = []
    if userinfo:
        found += [userinfo, userinfo.partition(":")[2]]
    for p in _params(query) + _params(fragment):
        name, _, value = p.partition("=")
        if value and _secret_param(name):
            found.append(value)
    found += [unquote(s) for s in found] + [unquote_plus(s) for s in found]
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """``text`` (an exception message, a command line) with every URI in it redacted and each
    of ``secrets`` (see ``uri_secrets``) replaced by ``***``."""
    text = _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)
    for s in secrets:
        text = text.replace(s, "***")
    return text


def redacted_config(cfg: Any) -> dict[str, Any]:
    """The plain-data view of a config (``evav.config.to_dict``) with the credentials of every
    URI in its strings removed: what RUN/config.yaml, checkpoints and MLflow params keep."""
    from evav.config import to_dict

    def clean(v: Any) -> Any:
        if isinstance(v, str):
            return redact_text(v) if "://" in v else v
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return clean(to_dict(cfg))


def default_tracking_uri(run_dir: Path) -> str:
    """``$MLFLOW_TRACKING_URI`` or a SQLite store beside the run directory."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(run_dir).resolve().parent / 'mlflow.db'}"


def sqlite_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """For a SQLite store, ``DB_DIR/mlartifacts/EXPERIMENT`` beside the database file: MLflow's
    own default, ``./mlruns``, is relative to whatever directory the process runs in (a repo
    checkout, a Slurm job's submit directory). None for a server, whose artifact root rules."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri.removeprefix("sqlite:///"))  # sqlite:////abs/x.db -> /abs/x.db
    return (db.resolve().parent / "mlartifacts" / experiment).as_uri()


class MetricsLogger:
    """Rank-0 metrics sink: jsonl always, MLflow in the background."""

    def __init__(
        self,
        run_dir: str | Path,
        cfg: MetricsConfig | None = None,
        params: dict[str, Any] | None = None,
        run_name: str | None = None,
        run_id: str | None = None,
    ):
        """``run_id``: the MLflow run to continue (from a checkpoint); default: the run dir's."""
        self.cfg = cfg or MetricsConfig()
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self._queue: queue.Queue = queue.Queue()
        self._thread = None
        self._closed = False
        self.run_id: str | None = run_id or read_run_id(self.run_dir / "mlflow_run_id")
        self._attached = False  # an existing run was checked (status, params) by this process
        self._contacted = threading.Event()  # the sender has the run, or has failed once
        self._run_name = run_name or self.run_dir.name
        self._params = _flatten(params or {})
        if self.cfg.enabled:
            self.tracking_uri = self.cfg.tracking_uri or default_tracking_uri(self.run_dir)
            self.shown_uri = redact_uri(self.tracking_uri)  # what messages show, never the real
            self._secrets = uri_secrets(self.tracking_uri)
            if has_credentials(self.tracking_uri):
                # MLflow prints "View run at URL" with the URL as given: not this one
                os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
                log.warning(
                    "MLflow tracking URI %s (from %s) carries credentials: they are used to "
                    "connect but never shown or stored; give them as MLFLOW_TRACKING_USERNAME / "
                    "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN instead "
                    "(docs/operations.md)",
                    self.shown_uri,
                    "metrics.tracking_uri" if self.cfg.tracking_uri else "$MLFLOW_TRACKING_URI",
                )
            self._thread = threading.Thread(target=self._sender, name="mlflow-sender", daemon=True)
            self._thread.start()

    # -- public ----------------------------------------------------------------------------
    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record metrics for ``step``: appended to metrics.jsonl now, to MLflow soon."""
        values = {k: float(v) for k, v in metrics.items() if v is not None}  # None: not measured
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        nonfinite = {}
        for k, v in values.items():
            record[k] = v if math.isfinite(v) else None
            if not math.isfinite(v):
                nonfinite[k] = "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if nonfinite:
            record["nonfinite"] = nonfinite
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")  # strict JSON
        self._jsonl.flush()
        if self._thread is not None:  # MLflow takes NaN and inf as they are
            self._queue.put(("metrics", {"step": record["step"], "time": record["time"], **values}))

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._thread is not None:
            self._queue.put(("tags", dict(tags)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload ``path`` (read when it is sent) under ``artifact_path`` of the run."""
        if self._thread is not None:
            self._queue.put(("artifact", (str(path), artifact_path)))

    def log_image(self, name: str, image_HWC: np.ndarray, step: int) -> Path:
        """Save a uint8 RGB image as ``RUN_DIR/images/NAME/step_NNNNNNNN.png`` and log it."""
        path = self.run_dir / "images" / name / f"step_{int(step):08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.png")
        Image.fromarray(np.ascontiguousarray(image_HWC, dtype=np.uint8)).save(tmp)
        tmp.replace(path)
        self.log_artifact(path, f"images/{name}")
        return path

    def wait_run_id(self) -> str | None:
        """The MLflow run id, waiting (at most ``close_timeout_s``) for the background thread's
        first contact with the store: a checkpoint written in the first seconds of a run must
        still name its run. None when MLflow is off or could not be reached."""
        if self._thread is not None:
            self._contacted.wait(self.cfg.close_timeout_s)
        return self.run_id

    def close(self, status: str = "FINISHED") -> None:
        """Send what MLflow has not yet taken and end the run with ``status`` (FINISHED, FAILED,
        KILLED), waiting up to ``close_timeout_s``; then stop. A second call does nothing."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(
                f"MLflow run status must be FINISHED, FAILED or KILLED, not {status!r}"
            )
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._queue.put(("close", status))
            self._thread.join(self.cfg.close_timeout_s)
            if self._thread.is_alive():
                log.warning(
                    "MLflow: gave up sending after %.0f s; metrics.jsonl is complete",
                    self.cfg.close_timeout_s,
                )
            self._thread = None
        self._jsonl.close()

    # -- background sender -------------------------------------------------------------------
    def _sender(self) -> None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        pending: list[tuple[str, Any]] = [
            ("open", None)
        ]  # first contact now: create/reopen the run
        closing, backoff, next_try, warned = False, 1.0, 0.0, False
        while not (closing and not pending):
            try:
                item = self._queue.get(timeout=1.0)
                while True:  # take everything queued
                    if item[0] == "close":
                        closing = True
                        pending.append(("terminate", item[1]))  # sent after all before it
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
                    log.warning("MLflow: reachable again at %s", self.shown_uri)
                    warned = False
            except Exception as e:  # noqa: BLE001 - any failure: keep the batch, retry later
                self._contacted.set()  # nobody waits for a store that is not there
                if not warned:
                    log.warning(
                        "MLflow at %s unreachable (%s: %s); retrying in the background, "
                        "metrics.jsonl keeps everything",
                        self.shown_uri,
                        type(e).__name__,
                        redact_text(str(e), self._secrets)[:200],  # MLflow's names the URL
                    )
                    warned = True
                next_try = time.monotonic() + (1.0 if closing else backoff)
                backoff = min(backoff * 2, 30.0)

    def _client(self):
        from mlflow.tracking import MlflowClient

        if getattr(self, "_mlflow", None) is None:
            self._mlflow = MlflowClient(self.tracking_uri)
        return self._mlflow

    def _ensure_run(self) -> str:
        """The run to log to: created (with params) on first contact, or the existing one
        set back to RUNNING with its missing params added (changed ones become tags)."""
        client = self._client()
        if self.run_id is not None and not self._attached:
            self._attach(client)
        if self.run_id is None:
            name = self.cfg.experiment
            exp = client.get_experiment_by_name(name)
            exp_id = (
                exp.experiment_id
                if exp
                else client.create_experiment(
                    name, sqlite_artifact_location(self.tracking_uri, name)
                )
            )
            run = client.create_run(exp_id, run_name=self._run_name)
            self.run_id = run.info.run_id
            _write_atomic(self.run_dir / "mlflow_run_id", self.run_id)
            self._log_params(client, self._params)
            self._attached = True
        self._contacted.set()
        return self.run_id

    def _attach(self, client) -> None:
        """Continue run ``self.run_id``; forget it (a new run follows) if the store lacks it."""
        from mlflow.entities import RunTag
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(self.run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning(
                "MLflow run %s (from %s) is not in %s; starting a new run",
                self.run_id,
                self.run_dir,
                self.shown_uri,
            )
            self.run_id = None
            return
        if run.info.status != "RUNNING":
            client.update_run(self.run_id, status="RUNNING")
        old = run.data.params
        new = {k: _param_value(v) for k, v in self._params.items()}
        self._log_params(client, {k: v for k, v in new.items() if k not in old})
        changed = {k: v for k, v in new.items() if k in old and old[k] != v}
        if changed:
            log.warning(
                "MLflow params are immutable: run %s keeps its values of %s; the new ones "
                "are tags changed_param.KEY",
                self.run_id,
                ", ".join(sorted(changed)),
            )
            tags = [RunTag(f"changed_param.{k}", v) for k, v in sorted(changed.items())]
            for i in range(0, len(tags), 100):
                client.log_batch(self.run_id, tags=tags[i : i + 100])
        self._attached = True

    def _log_params(self, client, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        batch = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(batch), 100):
            client.log_batch(self.run_id, params=batch[i : i + 100])

    def _send(self, items: list[tuple[str, Any]]) -> None:
        from mlflow.entities import Metric, RunTag

        run_id = self._ensure_run()
        client = self._client()
        metrics = [
            Metric(k, v, int(r["time"] * 1000), r["step"])
            for kind, r in items
            if kind == "metrics"
            for k, v in r.items()
            if k not in ("step", "time")
        ]
        for i in range(0, len(metrics), 900):
            client.log_batch(run_id, metrics=metrics[i : i + 900])
        for kind, payload in items:
            if kind == "tags":
                client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in payload.items()])
            elif kind == "artifact":
                client.log_artifact(run_id, payload[0], payload[1])
            elif kind == "terminate":
                client.set_terminated(run_id, payload)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _param_value(v: Any) -> str:
    """A param as MLflow stores it (a string of at most 6000 characters)."""
    return str(v)[:6000]


def read_run_id(path: Path) -> str | None:
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
