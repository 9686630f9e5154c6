"""Eval outputs: the results JSON, a markdown report with example clips, and the MLflow record.

    results.json                        task -> metrics, baselines, answer distribution, step, ...
    results_report/report.md            a table per task, the skipped samples, example clips
    results_report/examples/TASK_i.png  labelled rows input | predicted (read back) | true,
                                        frames upscaled (TASK: safe_name)

For a training checkpoint the default place is ``RUN/eval/DATASET/SPLIT/step_NNNNNNNN.json``
(``results_path``; DATASET: ``dataset_name``), so evaluations of other data or splits never
overwrite each other. A report folder is written beside its final place and swapped in whole
(``write_report``): it never keeps an example of an earlier evaluation.

Task names, answers and keys come from the data, so none is trusted: a name becomes a file name
only through ``safe_name`` (and an MLflow key only through it too), and text goes into the
markdown only through ``md_text`` (a ``|`` or a newline cannot break a table, a ``[x](url)``
is not a link).

MLflow: the metrics go to the checkpoint's training run when it has one (keys
``eval/DATASET/SPLIT/TASK/METRIC`` at the checkpoint's step, tags ``eval.step``,
``eval.dataset``, ``eval.split``), else to a new run in the experiment ``evav-eval``; the JSON
and the report are attached as artifacts under ``eval/DATASET/SPLIT/step_NNNNNNNN``. A tracking server that cannot be reached is reported once and never
fails the evaluation: the JSON file is the record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image

from evav.frames.write import labelled_sheet
from evav.manifest import write_json_atomic

log = logging.getLogger("evav.eval")

HEADLINE = {
    "classification": "accuracy",
    "open": "accuracy",
    "multilabel": "f1_macro",
    "tracking": "mean_iou",
    "colorization": "colorfulness",
    "video_prediction": "psnr",
}


NAME_MAX = 80  # characters of a file-name component made by safe_name
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_HASHED = re.compile(r"-[0-9a-f]{16}$")
_RESERVED = {"con", "prn", "aux", "nul", *(f"{p}{i}" for p in ("com", "lpt") for i in range(10))}


def safe_name(name: str, max_len: int = NAME_MAX) -> str:
    """Any string -> a file-name component that is safe everywhere and unique per ``name``.

    Only ``[A-Za-z0-9._-]`` is kept (``/``, NUL, newlines, unicode become ``_``); never empty,
    never ``.``/``..`` or hidden (no leading dot), no leading ``-``, at most ``max_len``
    characters. A name that is already safe, lowercase and short comes back as is; any other
    gets ``-`` and 16 hex digits of its sha256, so two different names never map to one file,
    also on case-insensitive file systems (an unchanged name never ends like a hashed one).
    """
    name = str(name)
    out = _UNSAFE.sub("_", name) or "_"
    if out[0] in ".-":
        out = "_" + out[1:]
    if out.endswith("."):  # Windows drops a trailing dot: "a." would be "a"
        out = out[:-1] + "_"
    changed = (
        out != name
        or len(out) > max_len
        or out != out.lower()
        or _HASHED.search(out) is not None
        or out.split(".")[0].lower() in _RESERVED
    )
    if not changed:
        return out
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{out[: max(1, max_len - 17)]}-{digest}"


_MD_SPECIAL = set("\\`*_[]<>|&~#")


def md_text(s: object, max_len: int = 200) -> str:
    """Text from the data made inert in markdown (a table cell, a heading, alt text): markdown
    and HTML characters backslash-escaped, control, format and unpaired surrogate characters
    shown as ``\\uXXXX``, at most ``max_len`` characters (then ``...``)."""
    s = str(s)
    cut = len(s) > max_len
    out = []
    for c in s[:max_len]:
        if c in _MD_SPECIAL:
            out.append("\\" + c)
        elif unicodedata.category(c) in ("Cc", "Cf", "Cs", "Cn", "Zl", "Zp"):
            out.append(f"\\\\u{ord(c):04x}")  # a visible \uXXXX, the backslash escaped
        else:
            out.append(c)
    return "".join(out) + ("..." if cut else "")


def _strict_json(v):
    """NaN and infinities as null: the results file is strict JSON (run.py flags which)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _strict_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_strict_json(x) for x in v]
    return v


def write_results(results: dict, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        out, _strict_json({k: v for k, v in results.items() if not k.startswith("_")})
    )
    return out


def summary_table(results: dict) -> str:
    """A markdown table: task, kind, samples evaluated and skipped, headline metric, chance,
    the trivial baseline (majority answer, or copying the last input frame) and the answer
    distribution of the evaluated samples."""
    rows = [
        "| task | kind | samples | skipped | metric | value | chance | baseline | answers |",
        "|---|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for task, r in results["tasks"].items():
        metric = HEADLINE.get(r["kind"], "?")  # "?": no sample was readable, the kind unknown
        value = r.get(metric)
        chance = r.get("chance")
        shown = (
            f"{value:.3f}"
            if isinstance(value, (int, float)) and math.isfinite(value)
            else "n/a"
            if r["samples"]
            else "not evaluated"
        )
        rows.append(
            f"| {md_text(task)} | {r['kind'] or '?'} | {r['samples']} | {_skipped_cell(r)} | "
            f"{metric} | {shown} | {'' if chance is None else f'{chance:.3f}'} | "
            f"{_baseline_cell(r)} | {_answers_cell(r)} |"
        )
    return "\n".join(rows)


def _baseline_cell(r: dict) -> str:
    """``0.520 majority`` or ``12.345 copy-last`` (empty when the task has neither)."""
    for key, what in (("majority", "majority"), ("copy_last_psnr", "copy-last")):
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            return f"{v:.3f} {what}"
    return ""


ANSWERS_SHOWN = 4  # answers listed in a table cell (the JSON has them all)


def _answers_cell(r: dict) -> str:
    """``one 26, zero 24`` (most frequent first), ``...`` and the count beyond ANSWERS_SHOWN."""
    answers = r.get("answers") or []
    cell = ", ".join(f"{md_text(a, 40)} {n}" for a, n in answers[:ANSWERS_SHOWN])
    more = len(answers) - ANSWERS_SHOWN
    return cell + (f", ... ({len(answers)} answers)" if more > 0 else "")


def _skipped_cell(r: dict) -> str:
    """``0``, or ``3 (checksum 2, decode 1)``."""
    n, reasons = r.get("skipped_total", 0), r.get("skipped", {})
    if not n:
        return "0"
    return f"{n} ({', '.join(f'{md_text(k)} {v}' for k, v in reasons.items())})"


def skipped_summary(results: dict) -> str:
    """One line: how many samples were skipped and why (empty when none was)."""
    n = results.get("skipped_total", 0)
    if not n:
        return ""
    why = ", ".join(f"{k} {v}" for k, v in results.get("skipped", {}).items())
    return f"skipped {n} bad sample(s): {why} (listed under skipped_samples in the results JSON)"


REPORT_SKIPPED = 50  # skipped samples listed in report.md


def write_report(results: dict, directory: Path) -> Path:
    """report.md with the summary table and labelled example images, written into a fresh
    folder that then replaces ``directory`` whole (no stale example survives). A non-empty
    ``directory`` without a report.md is not a report folder: ValueError, nothing touched."""
    directory = Path(directory)
    if directory.exists() and not (directory / "report.md").is_file() and any(directory.iterdir()):
        raise ValueError(f"{directory}: not an evaluation report folder; refusing to replace it")
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_report_files(results, tmp)
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory / "report.md"


def _write_report_files(results: dict, directory: Path) -> None:
    ex_dir = directory / "examples"
    ex_dir.mkdir(parents=True)
    lines = [
        f"# Evaluation of {md_text(results.get('checkpoint', '?'), 500)} "
        f"(step {results.get('step', '?')})",
        "",
        f"Split {md_text(results['split'])} of "
        f"{', '.join(md_text(d, 500) for d in results['datasets'])}; "
        f"render hash {md_text(results['render_hash'])}.",
        "",
        summary_table(results),
        "",
        "chance: a uniform guess among the task's answers; baseline: always the most frequent "
        "answer of the evaluated samples (majority), or every predicted frame a copy of the "
        "last input frame (copy-last, PSNR dB).",
        "",
    ]
    listed = results.get("skipped_samples", [])
    if listed:
        lines += [
            f"## Skipped samples ({results.get('skipped_total', len(listed))})",
            "",
            "| where | task | reason | why |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {md_text(s['where'])} | {md_text(s['task'] or '?')} | {md_text(s['reason'])} | "
            f"{md_text(s['why'], 300)} |"
            for s in listed[:REPORT_SKIPPED]
        ]
        if len(listed) > REPORT_SKIPPED or results.get("skipped_total", 0) > len(listed):
            lines.append(f"| ... | | | the results JSON lists up to {len(listed)} |")
        lines.append("")
    lines += ["## Examples (rows: input | predicted, read back | true)", ""]
    for task, clips in results.get("_examples", {}).items():
        for i, (prompt, pred, true, rec) in enumerate(clips):
            name = f"{safe_name(task)}_{i}.png"
            Image.fromarray(example_sheet(task, prompt, pred, true, rec)).save(ex_dir / name)
            lines.append(f"**{md_text(task)}** {i}: ![{md_text(task)} {i}](examples/{name})")
            lines.append("")
    (directory / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def example_sheet(task: str, prompt, pred, true, rec: dict | None = None) -> np.ndarray:
    """One example as a labelled sheet: the task name, then the prompt, the generated frames
    (with what was read back from them) and the true frames, each row labelled."""
    rec = rec or {}
    return labelled_sheet(
        f"task: {task}" + (f"   key {rec['key']}" if "key" in rec else ""),
        [
            ("input", prompt),
            ("predicted" + _readback_text(rec), pred),
            ("true" + (f": {_show(rec['true'])}" if "true" in rec else ""), true),
        ],
    )


def _readback_text(rec: dict) -> str:
    """What the reader made of the generated frames, for a row label."""
    if "pred" in rec:
        verdict = " (right)" if rec.get("pred") == rec.get("true") else " (wrong)"
        return f", read back: {_show(rec['pred'])}{verdict}"
    for key, fmt in (
        ("psnr_per_frame", "PSNR {:.1f} dB"),
        ("iou", "IoU {:.2f}"),
        ("colorfulness", "colourfulness {:.1f}"),
    ):
        v = rec.get(key)
        v = _mean(v) if isinstance(v, list) else v
        if isinstance(v, (int, float)) and math.isfinite(v):
            text = ", " + fmt.format(v)
            base = _mean(rec.get("copy_last_psnr_per_frame") or [])
            if key == "psnr_per_frame" and math.isfinite(base):
                text += f" (copy-last {base:.1f})"
            return text
    return ""


def _mean(xs) -> float:
    vals = [min(float(x), 100.0) for x in xs if isinstance(x, (int, float))]
    return float(np.mean(vals)) if vals else float("nan")


def _show(v) -> str:
    from evav.eval.samples import one_line

    return one_line(repr(v) if isinstance(v, str) else str(v), 100)


def predictions_sheet(examples: Path, out: Path) -> Path:
    """The first example image of every task (``*_0.png`` of a report's examples folder, each
    already labelled by ``example_sheet``) stacked into one PNG."""
    files = sorted(Path(examples).glob("*_0.png")) or sorted(Path(examples).glob("*.png"))
    if not files:
        raise FileNotFoundError(f"{examples}: the eval report has no example images")
    tiles = [Image.open(f).convert("RGB") for f in files]
    gap = 6
    sheet = Image.new(
        "RGB", (max(t.width for t in tiles), sum(t.height + gap for t in tiles)), (16, 16, 16)
    )
    y = 0
    for t in tiles:
        sheet.paste(t, (0, y))
        y += t.height + gap
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def dataset_name(dirs: list[str]) -> str:
    """The name evaluations of ``dirs`` are filed under: each data folder's name (its last path
    component, also for a URL), ``+``-joined, made a safe file-name component."""
    return safe_name("+".join(str(d).rstrip("/").rsplit("/", 1)[-1] for d in dirs))


def results_path(run_dir: Path, dataset: str, split: str, step: int) -> Path:
    """``RUN/eval/DATASET/SPLIT/step_NNNNNNNN.json``."""
    return Path(run_dir) / "eval" / dataset / safe_name(split) / f"step_{step:08d}.json"


def scalar_metrics(results: dict) -> dict[str, float]:
    """``eval/DATASET/SPLIT/TASK/METRIC`` -> value, for every finite number of every task."""
    prefix = f"eval/{results['dataset']}/{safe_name(results['split'])}"
    out = {}
    for task, r in results["tasks"].items():
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[f"{prefix}/{safe_name(task)}/{k}"] = float(v)
    return out


def log_mlflow(
    results: dict, files: list[Path], tracking_uri: str | None, run_id: str | None, step: int
) -> str | None:
    """Log to the training run (or a new ``evav-eval`` run); returns the run id, None on failure."""
    from evav.metrics import redact_text, uri_secrets

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        from mlflow.entities import Metric, RunTag
        from mlflow.tracking import MlflowClient

        from evav.metrics import sqlite_artifact_location

        client = MlflowClient(tracking_uri=tracking_uri)
        if run_id is not None:
            client.get_run(run_id)  # raises when the store does not have it
        else:
            exp = client.get_experiment_by_name("evav-eval")
            exp_id = (
                exp.experiment_id
                if exp
                else client.create_experiment(
                    "evav-eval", sqlite_artifact_location(tracking_uri or "", "evav-eval")
                )
            )
            run_id = client.create_run(exp_id, run_name=f"eval-step{step}").info.run_id
        import time

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalar_metrics(results).items()]
        client.log_batch(
            run_id,
            metrics=metrics,
            tags=[
                RunTag("eval.step", str(step)),
                RunTag("eval.render_hash", results["render_hash"]),
                RunTag("eval.dataset", results["dataset"]),
                RunTag("eval.split", results["split"]),
            ],
        )
        where = f"eval/{results['dataset']}/{safe_name(results['split'])}/step_{step:08d}"
        for f in files:
            if f.is_dir():
                client.log_artifacts(run_id, str(f), f"{where}/{f.name}")
            else:
                client.log_artifact(run_id, str(f), where)
        return run_id
    except Exception as e:  # noqa: BLE001 - the JSON file is the record; MLflow is best effort
        log.warning(
            "MLflow logging failed (%s: %s); results are in the JSON file",
            type(e).__name__,
            redact_text(str(e), uri_secrets(tracking_uri))[:200],  # MLflow quotes the URL
        )
        return None


def dumps(results: dict) -> str:
    return json.dumps({k: v for k, v in results.items() if not k.startswith("_")}, indent=1)
