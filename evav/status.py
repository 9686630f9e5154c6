"""`evav status RUN`: where a training run stands, read from its run directory.

    evav status runs/exp1              # plain text
    evav status runs/exp1 --json       # the same as one JSON object

What it reports, and where it comes from (nothing is written, nothing is renamed):

- **state**: ``running`` when a process holds the run lock (``RUN/.lock``, evav.runlock): the lock
  is probed with a non-blocking shared ``flock`` that is released at once, and the holder's
  record names the pid, host, start time and Slurm job. A record of another host refreshed
  within ``runlock.STALE_S`` counts as running too (file locks may not reach across nodes: the
  rule of evav.runlock). Otherwise ``finished`` (the last logged step is the config's
  ``steps``), ``stopped`` (it stopped before; rerun to resume) or ``not started``.
- **step and ETA**: the last step in ``RUN/metrics.jsonl`` (evav.metrics.read_metrics) of the
  config's ``steps``; the ETA (while running) from the wall-clock rate of the recent log lines
  of this process's stretch of training (since the last resume).
- **throughput**: frames/s (the trainer's own ``speed/frames_per_s``, averaged over the recent
  lines) and samples/s (``train/samples`` over wall-clock time between them).
- **checkpoint**: the newest checkpoint that *verifies* (evav.checkpoint.last_good: its
  ``COMPLETE`` marker and the size and sha256 of every file it lists), the newer committed ones
  that fail, and the ones set aside. ``--no-verify`` skips the hashing (names the newest
  committed checkpoint, unverified).
- **eval**: the newest results under ``RUN/eval/`` (``evav eval``), one per dataset and split,
  with each task's headline metric.
- **MLflow**: the run id (``RUN/mlflow_run_id``), the tracking URI (redacted: evav.metrics) and
  a link to the run page (its experiment id is asked from the store; ``--no-mlflow`` does not).

A folder that is not a run directory is a one-line error (exit status 2).
"""

from __future__ import annotations

import argparse
import datetime
import errno
import fcntl
import json
import math
import os
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any

from evav.errors import BadInputError

RECENT = 10  # log lines the rates are taken over
_RUN_MARKS = ("config.yaml", "metrics.jsonl", "checkpoints")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory (run_dir of `evav train`)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="name the newest committed checkpoint without hashing its files",
    )
    p.add_argument("--no-mlflow", action="store_true", help="do not ask MLflow for the run page")


def main(args: argparse.Namespace) -> int:
    info = status(args.run_dir, verify=not args.no_verify, mlflow=not args.no_mlflow)
    print(json.dumps(info, indent=1) if args.json else format_status(info))
    return 0


# -- gathering ---------------------------------------------------------------------------------


def check_run_dir(run_dir: str | Path) -> Path:
    """``run_dir`` resolved; BadInputError (one line) when it is not a run directory."""
    p = Path(run_dir)
    if not p.exists():
        raise BadInputError(p, "no such directory")
    if not p.is_dir():
        raise BadInputError(p, "not a directory, so not a run directory")
    if (p / "export.json").is_file() and (p / "model.safetensors").is_file():
        raise BadInputError(
            p, "an export (evav export), not a run directory; its README.md says what it is"
        )
    if (p / "train_state.pt").is_file() or (p / "COMPLETE").is_file():
        raise BadInputError(
            p, f"a checkpoint, not a run directory; give its run directory ({p.parent.parent})"
        )
    if not any((p / m).exists() for m in _RUN_MARKS):
        raise BadInputError(
            p,
            "not a run directory (no config.yaml, metrics.jsonl or checkpoints/ in it; "
            "give the run_dir of `evav train`)",
        )
    return p.resolve()


def status(run_dir: str | Path, verify: bool = True, mlflow: bool = True) -> dict[str, Any]:
    """Everything `evav status` shows, as plain data."""
    from evav.metrics import read_metrics

    run = check_run_dir(run_dir)
    config = read_config(run)
    steps = _int(config.get("steps"))
    records = read_metrics(run)
    train = [r for r in records if "train/loss" in r or "speed/frames_per_s" in r]
    from evav import checkpoint

    committed = checkpoint.complete_checkpoints(run)
    step = max((_int(r.get("step")) or 0 for r in records), default=0)
    step = max(step, committed[-1][0] if committed else 0)  # metrics.jsonl lost or cut short
    lock = lock_state(run)
    info: dict[str, Any] = {
        "run_dir": str(run),
        "state": "",
        "step": step,
        "steps": steps,
        "progress": step / steps if steps else None,
        "lock": lock,
        "loss": _last(train, "train/loss"),
        "loss_step": _int(train[-1].get("step")) if train else None,
        "last_log": _iso(train[-1].get("time")) if train else None,
    }
    info.update(throughput(train))
    running = lock["running"]
    if running:
        info["state"] = "running"
    elif steps and step >= steps:
        info["state"] = "finished"
    elif records or (run / "checkpoints").is_dir():
        info["state"] = "stopped"
    else:
        info["state"] = "not started"
    eta = None
    if running and steps and step < steps and info["steps_per_s"]:
        eta = (steps - step) / info["steps_per_s"]
    info["eta_s"] = eta
    info["checkpoint"] = checkpoint_state(run, verify)
    info["eval"] = eval_results(run)
    info["mlflow"] = mlflow_state(run, config, ask=mlflow)
    return info


def read_config(run: Path) -> dict[str, Any]:
    """``RUN/config.yaml`` as plain data ({} when missing or unreadable)."""
    import yaml

    try:
        data = yaml.safe_load((run / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def lock_state(run: Path) -> dict[str, Any]:
    """Whether a process holds the run lock, and who (evav.runlock's record)."""
    from evav import runlock

    path = run / runlock.LOCK_NAME
    out: dict[str, Any] = {"running": False, "flock": None, "holder": None, "note": None}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return out
    except OSError as e:
        out["note"] = f"cannot open {path}: {e.strerror}"
        return out
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            out["note"] = f"{path} is not a regular file"
            return out
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            out["flock"] = "held"
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            out["flock"] = "unsupported"
        else:
            out["flock"] = "free"
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    holder = runlock.read_holder(run)
    if holder is not None:
        age = time.time() - holder.refreshed
        out["holder"] = {
            "host": holder.host,
            "pid": holder.pid,
            "started": holder.started,
            "slurm_job_id": holder.slurm_job_id,
            "refreshed_s_ago": round(age, 1),
        }
    if out["flock"] == "held":
        out["running"] = True
    elif holder is not None and holder.host != socket.gethostname() and age <= runlock.STALE_S:
        # the rule of evav.runlock: flock may not reach across nodes
        out["running"] = True
        out["note"] = (
            f"the lock record of host {holder.host} was refreshed {age:.0f} s ago "
            "(file locks may not reach across nodes here)"
        )
    elif out["flock"] == "unsupported" and holder is not None:
        alive = holder.host == socket.gethostname() and runlock.pid_alive(holder.pid)
        out["running"] = alive
        out["note"] = "this filesystem has no flock: the holder record decided"
    if not out["running"]:
        out["holder"] = None if out["flock"] == "free" else out["holder"]
    return out


def throughput(train: list[dict]) -> dict[str, Any]:
    """Rates over the recent log lines of the last stretch of training (since a resume: a step
    that does not grow starts a new stretch)."""
    stretch: list[dict] = []
    for r in train:
        if stretch and not (_int(r.get("step")) or 0) > (_int(stretch[-1].get("step")) or 0):
            stretch = []
        stretch.append(r)
    recent = stretch[-RECENT:]
    fps = [r["speed/frames_per_s"] for r in recent if _num(r.get("speed/frames_per_s"))]
    out: dict[str, Any] = {
        "frames_per_s": sum(fps) / len(fps) if fps else None,
        "samples_per_s": None,
        "steps_per_s": None,
        "rate_lines": len(recent),
    }
    if len(recent) >= 2:
        first, last = recent[0], recent[-1]
        dt = (last.get("time") or 0) - (first.get("time") or 0)
        if dt > 0:
            out["steps_per_s"] = (last["step"] - first["step"]) / dt
            if _num(last.get("train/samples")) and _num(first.get("train/samples")):
                out["samples_per_s"] = (last["train/samples"] - first["train/samples"]) / dt
    elif len(recent) == 1 and _num(recent[0].get("speed/step_s")) and recent[0]["speed/step_s"]:
        out["steps_per_s"] = 1.0 / recent[0]["speed/step_s"]  # one line: the trainer's own
    return out


def checkpoint_state(run: Path, verify: bool = True) -> dict[str, Any]:
    """The newest checkpoint that verifies (or, unverified, the newest committed one)."""
    from evav import checkpoint

    done = checkpoint.complete_checkpoints(run)
    out: dict[str, Any] = {
        "path": None,
        "step": None,
        "verified": False,
        "committed": len(done),
        "failing": [],
        "set_aside": [str(p) for p in checkpoint.set_aside_dirs(run)],
    }
    if not verify:
        if done:
            out.update(path=str(done[-1][1]), step=done[-1][0])
        return out
    for step, p in reversed(done):
        v = checkpoint.verify(p)
        if v.ok:
            out.update(path=str(p), step=step, verified=True, legacy=v.legacy)
            break
        if p.exists():  # retention may delete one while it is read: that one is no failure
            out["failing"].append({"path": str(p), "reason": v.reason})
    return out


def eval_results(run: Path) -> list[dict[str, Any]]:
    """The newest ``evav eval`` results under ``RUN/eval``, one per dataset and split, newest
    step first, each with its tasks' headline metrics."""
    root = run / "eval"
    newest: dict[tuple[str, str], dict] = {}
    if not root.is_dir():
        return []
    for path in sorted(root.rglob("step_*.json")):
        try:
            r = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if not isinstance(r, dict) or not isinstance(r.get("tasks"), dict):
            continue
        step = _int(r.get("step"))
        if step is None:
            continue
        dataset = str(r.get("dataset") or _dataset_of(r))
        key = (dataset, str(r.get("split", "")))
        if key not in newest or step >= newest[key]["step"]:
            newest[key] = {
                "path": str(path),
                "step": step,
                "dataset": dataset,
                "split": str(r.get("split", "")),
                "tasks": headline(r["tasks"]),
            }
    return sorted(newest.values(), key=lambda e: (-e["step"], e["dataset"], e["split"]))


def headline(tasks: dict) -> dict[str, dict[str, Any]]:
    """Task -> kind, samples, its headline metric and value (evav.eval.report.HEADLINE)."""
    from evav.eval.report import HEADLINE

    out = {}
    for task, m in tasks.items():
        if not isinstance(m, dict):
            continue
        metric = HEADLINE.get(str(m.get("kind")), "")
        value = m.get(metric)
        out[str(task)] = {
            "kind": m.get("kind"),
            "samples": m.get("samples"),
            "metric": metric or None,
            "value": value if _num(value) else None,
        }
    return out


def mlflow_state(run: Path, config: dict, ask: bool = True) -> dict[str, Any] | None:
    """The MLflow run this directory logs to: id, tracking URI (redacted), a link to its page
    (for a SQLite store, the link of `mlflow ui` started with the command given)."""
    from evav.metrics import default_tracking_uri, read_run_id, redact_uri

    run_id = read_run_id(run / "mlflow_run_id")
    metrics = config.get("metrics") if isinstance(config.get("metrics"), dict) else {}
    if run_id is None:
        return None
    uri = metrics.get("tracking_uri") or default_tracking_uri(run)
    out: dict[str, Any] = {
        "run_id": run_id,
        "tracking_uri": redact_uri(uri),
        "experiment_id": None,
        "link": None,
        "ui_command": None,
        "note": None,
    }
    base = redact_uri(uri).rstrip("/")
    if uri.startswith("sqlite:"):
        out["ui_command"] = f"mlflow ui --backend-store-uri {redact_uri(uri)}"
        base = "http://127.0.0.1:5000"
    elif not uri.startswith(("http://", "https://", "databricks")):
        base = ""
    if ask:
        exp, note = _experiment_of(uri, run_id)
        out["experiment_id"], out["note"] = exp, note
    if base and out["experiment_id"] is not None:
        out["link"] = f"{base}/#/experiments/{out['experiment_id']}/runs/{run_id}"
    return out


def _experiment_of(uri: str, run_id: str) -> tuple[str | None, str | None]:
    """The run's experiment id from the store (a few seconds at most), or why not."""
    from evav.metrics import redact_text, uri_secrets

    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES",)}
    saved["MLFLOW_HTTP_REQUEST_TIMEOUT"] = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # a status line, not a retry loop
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"
    try:
        from mlflow.tracking import MlflowClient

        return MlflowClient(uri).get_run(run_id).info.experiment_id, None
    except Exception as e:  # noqa: BLE001 - the store's answer, told in one line
        text = " ".join(str(e).split())[:200]
        return None, f"MLflow did not answer: {redact_text(text, uri_secrets(uri))}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- showing -----------------------------------------------------------------------------------


def format_status(info: dict[str, Any]) -> str:
    rows = [("run", info["run_dir"])]
    lock = info["lock"]
    state = info["state"]
    h = lock.get("holder")
    if state == "running" and h:
        job = f", Slurm job {h['slurm_job_id']}" if h.get("slurm_job_id") else ""
        state += f" (pid {h['pid']} on host {h['host']} since {h['started']}{job})"
    elif state == "stopped":
        state += " (no process holds the run lock; rerun the same command to resume)"
    if lock.get("note"):
        state += f"; {lock['note']}"
    rows.append(("state", state))
    steps = info["steps"]
    step = f"{info['step']:,}" + (f"/{steps:,} ({info['progress']:.0%})" if steps else "")
    if info["eta_s"] is not None:
        step += f", ETA {_duration(info['eta_s'])} (at {info['steps_per_s']:.3g} steps/s)"
    rows.append(("step", step))
    speed = []
    if info["frames_per_s"] is not None:
        speed.append(f"{info['frames_per_s']:,.0f} frames/s")
    if info["samples_per_s"] is not None:
        speed.append(f"{info['samples_per_s']:,.1f} samples/s")
    if speed:
        rows.append(("speed", ", ".join(speed) + f" (last {info['rate_lines']} log lines)"))
    if info["loss"] is not None:
        rows.append(
            ("loss", f"{info['loss']:.4f} at step {info['loss_step']} ({info['last_log']})")
        )
    ck = info["checkpoint"]
    if ck["path"]:
        how = "verified" if ck["verified"] else "committed, not verified (--no-verify)"
        rows.append(("checkpoint", f"{ck['path']} (step {ck['step']}, {how})"))
    else:
        rows.append(("checkpoint", "none that verifies" if ck["committed"] else "none yet"))
    for f in ck["failing"]:
        rows.append(("", f"{f['path']} fails verification: {f['reason']}"))
    if ck["set_aside"]:
        rows.append(("", f"set aside: {', '.join(ck['set_aside'])}"))
    if not info["eval"]:
        rows.append(("eval", "none yet (evav eval RUN --data DIR)"))
    for i, e in enumerate(info["eval"]):
        tasks = ", ".join(
            f"{t} {m['metric']} {m['value']:.3f}" if m["value"] is not None else f"{t} n/a"
            for t, m in e["tasks"].items()
        )
        where = f"{e['dataset']}/{e['split']}" if e["split"] else e["dataset"]
        rows.append(("eval" if i == 0 else "", f"step {e['step']} {where}: {tasks} ({e['path']})"))
    ml = info["mlflow"]
    if ml is None:
        rows.append(("mlflow", "no MLflow run recorded (RUN/mlflow_run_id)"))
    else:
        text = f"run {ml['run_id']} at {ml['tracking_uri']}"
        if ml["link"]:
            text += f"\n{'':12}{ml['link']}"
        if ml["ui_command"]:
            text += f"\n{'':12}(view with: {ml['ui_command']})"
        if ml["note"]:
            text += f"\n{'':12}{ml['note']}"
        rows.append(("mlflow", text))
    return "\n".join(f"{k:<11} {v}" for k, v in rows)


# -- helpers -----------------------------------------------------------------------------------


def _dataset_of(results: dict) -> str:
    names = results.get("datasets")  # the manifests' names, in results of an older evav
    if isinstance(names, list) and names:
        return "+".join(map(str, names))
    return ""


def _duration(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _iso(t: Any) -> str | None:
    if not _num(t):
        return None
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _last(records: list[dict], key: str) -> float | None:
    for r in reversed(records):
        if _num(r.get(key)):
            return r[key]
    return None


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


if __name__ == "__main__":  # python -m evav.status RUN
    p = argparse.ArgumentParser(prog="evav status")
    add_arguments(p)
    sys.exit(main(p.parse_args()))
