"""`evav submit`: put training (and its evaluation) or a preprocessing build on a Slurm cluster.

    evav submit CONFIG.yaml [key=value ...] --run-dir RUN [--nodes N] [--gpus-per-node G]
                [--time HH:MM:SS] [--partition P] [--account A] [--signal-grace 120]
                [--eval-data DIR[,DIR]] [--sbatch=--OPTION=VALUE ...] [--dry-run]
    evav submit --preprocess BUILDER [--src RAW] --out DIR [--parts N] [--cpus-per-task C]
                [key=value ...] [--dry-run]

Training: the config is resolved (defaults < YAML < overrides, strictly checked), with
``run_dir`` and the ``data.train`` directories made absolute, and written to RUN/config.yaml;
the code version (git commit + ``git diff`` of the checkout, or the evav version) goes to
RUN/code/; ``slurm/train.sbatch`` is rendered into RUN/train.sbatch (its ``#SBATCH`` lines set
from the options, the job's settings exported after them) and submitted with ``sbatch``. With
``--eval-data``, ``slurm/eval.sbatch`` is rendered into RUN/eval.sbatch and submitted with
``--dependency=afterok:TRAIN_JOB``: it evaluates the run's last checkpoint into
RUN/eval/DATASET/SPLIT/step_NNNNNNNN.json once training has finished for good (requeues included).
Submitting again with the same RUN and the same config resumes the run; another config is refused.
A submission that fails before sbatch has taken the training job (sbatch refuses it: an unknown
partition, a bad option) leaves the run directory as it was (what it wrote is removed, what it
replaced is put back), so a corrected retry, with another config too, goes through. When only
the chained evaluation is refused, the training job stays submitted (and recorded) and the
error says so.

Preprocessing: ``slurm/preprocess.sbatch`` is rendered into OUT/.slurm/ and submitted as an
array of N parts plus a merge job that runs after the whole array succeeded (afterok).

Every rendered script is complete: ``sbatch RUN/train.sbatch`` submits the same job again.
``--dry-run`` prints the scripts and the sbatch commands and writes nothing.

Nothing given on the command line can add a line to a script. A value on an ``#SBATCH`` line
(``--partition``, ``--account``, ``--job-name``, ``--time``, ``--sbatch=--OPTION=VALUE``, the
``--output`` paths made from ``--run-dir`` / ``--out``) must match a strict pattern
(``SLURM_VALUES``: letters, digits and a few of ``_ . - , : + = @ % ~ / [ ] * & |`` per option;
never whitespace, a newline, a quote, a backslash, ``$``, a backtick, ``;``, ``#``, parentheses
or angle brackets), else it is refused with an error naming the option: sbatch reads those lines
itself, and a newline would end the comment. Everything that reaches a shell line (the exported
paths, the script arguments and overrides) is quoted with ``shlex.quote``. A training config
whose URIs carry credentials (``metrics.tracking_uri=http://user:password@...``) is refused:
RUN/config.yaml is the job's config and never holds a secret (docs/operations.md, credentials).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import evav
from evav.config import dump_yaml, load_config, to_dict
from evav.metrics import redact_text, redacted_config

REPO = Path(evav.__file__).resolve().parents[1]
TEMPLATES = REPO / "slurm"
SIGNAL = "USR2"  # the signal the trainer checkpoints and requeues on (evav.preemption)
MEMORY_OPTIONS = ("mem", "mem-per-cpu", "mem-per-gpu")  # sbatch accepts only one of them
UNTRACKED_DIRS = ("evav", "preprocessing", "configs", "slurm", "tools")
UNTRACKED_MAX_BYTES = 1 << 20

# What an #SBATCH value may hold, per option: (pattern, the allowed characters in words). These
# lines are comments to bash, but sbatch parses them (whitespace splits, quotes and backslashes
# are interpreted, `#` starts a comment) and a newline ends one: so none of those, and none of
# the shell's own metacharacters either, in case a value is ever copied into a command.
_NAME = r"[A-Za-z0-9_.-]+"
_NAMES = (rf"{_NAME}(?:,{_NAME})*", "letters, digits and _ . - (several: comma-separated)")
_PATH_CHARS = r"A-Za-z0-9_.+,:=@~/-"
SLURM_VALUES: dict[str, tuple[str, str]] = {
    "partition": _NAMES,
    "qos": _NAMES,
    "reservation": _NAMES,
    "clusters": _NAMES,
    "account": (_NAME, "letters, digits and _ . -"),
    "job-name": (r"[A-Za-z0-9_.+:@,-]+", "letters, digits and _ . + : @ , -"),
    "time": (r"(?:[0-9]+-)?[0-9]+(?::[0-9]+){0,2}", "e.g. 30 (minutes), 04:00:00 or 2-00:00:00"),
    "output": (rf"[%{_PATH_CHARS}]+", "letters, digits and _ . + , : = @ ~ / - and %"),
    "error": (rf"[%{_PATH_CHARS}]+", "letters, digits and _ . + , : = @ ~ / - and %"),
}
_ANY_VALUE = (
    r"[A-Za-z0-9_.+,:=@%~/\[\]*&|-]*",
    "letters, digits and _ . + , : = @ % ~ / - [ ] * & |",
)
_SAFE_CHAR = re.compile(_ANY_VALUE[0].removesuffix("*"))


class SubmitError(Exception):
    """Something that stops a submission; the message says what and how to fix it."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = (
        "Config overrides (training) or builder options (preprocessing) go anywhere as "
        "key=value. Extra sbatch options for every job: --sbatch=--qos=high (repeatable)."
    )
    p.add_argument("config", nargs="?", help="training config YAML (e.g. configs/debug.yaml)")
    p.add_argument("--run-dir", help="training: the run directory (one per run, shared filesystem)")
    p.add_argument("--nodes", type=int, default=1, help="training nodes (default 1)")
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=0,
        help="GPUs per node, one task each (default 0: CPU, one task per node)",
    )
    p.add_argument("--cpus-per-task", type=int, help="CPUs per task (default: the template's)")
    p.add_argument("--time", help="time limit, e.g. 24:00:00 or 2-00:00:00 (default: template's)")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--account", help="Slurm account")
    p.add_argument("--job-name", help="default: evav-train-RUN, evav-eval-RUN, evav-preprocess-OUT")
    p.add_argument(
        "--signal-grace",
        type=int,
        default=120,
        metavar="S",
        help=f"send {SIGNAL} (checkpoint + requeue) S seconds before the time limit",
    )
    p.add_argument(
        "--eval-data", help="after training: evaluate on these dataset dirs (comma-sep.)"
    )
    p.add_argument("--eval-time", default="02:00:00", help="time limit of the evaluation job")
    p.add_argument("--eval-limit", type=int, help="evaluate at most N samples per task")
    p.add_argument("--preprocess", metavar="BUILDER", help="submit a preprocessing build instead")
    p.add_argument("--src", help="preprocessing: the raw dataset folder")
    p.add_argument("--out", help="preprocessing: the output folder")
    p.add_argument("--parts", type=int, default=4, help="preprocessing: array tasks (default 4)")
    p.add_argument("--shard-samples", type=int, help="preprocessing: inputs per shard")
    p.add_argument("--codec", help="preprocessing: codec preset")
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="--OPTION=VALUE",
        help="an extra sbatch option for every job (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted")


def main(args: argparse.Namespace) -> int:
    try:
        if args.preprocess:
            submit_preprocessing(args)
        else:
            submit_training(args)
    except SubmitError as e:
        print(f"evav submit: error: {e}", file=sys.stderr)
        return 2
    return 0


# -- training ------------------------------------------------------------------------------


def submit_training(args: argparse.Namespace) -> list[int]:
    """Resolve, snapshot, render and submit training (and the chained evaluation)."""
    from evav.train import TrainConfig

    if not args.config:
        raise SubmitError("give a training CONFIG.yaml, or --preprocess BUILDER")
    for name in ("src", "out", "shard_samples", "codec"):
        if getattr(args, name) is not None:
            raise SubmitError(f"--{name.replace('_', '-')} is for --preprocess builds only")
    if not args.run_dir:
        raise SubmitError("--run-dir RUN is required (one directory per run)")
    if args.nodes < 1 or args.gpus_per_node < 0:
        raise SubmitError("--nodes must be >= 1 and --gpus-per-node >= 0")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise SubmitError("--cpus-per-task must be >= 1")
    run_dir = _slurm_path("--run-dir", Path(args.run_dir).expanduser().resolve())
    cfg = load_config(TrainConfig, args.config, [*args.overrides, f"run_dir={run_dir}"])
    cfg.data.train = [str(_dataset_dir(d, "data.train")) for d in cfg.data.train]
    if not cfg.data.train:
        raise SubmitError("data.train is empty: give data.train=[DIR,...] (shard directories)")
    _refuse_credentials(cfg)
    config_yaml = dump_yaml(cfg)
    _check_same_run(run_dir, config_yaml)
    eval_dirs = [_dataset_dir(d, "--eval-data") for d in (args.eval_data or "").split(",") if d]
    if args.eval_data is not None and not eval_dirs:
        raise SubmitError("--eval-data: give one or more dataset directories")

    if args.signal_grace < 1:
        raise SubmitError(f"--signal-grace {args.signal_grace}: must be at least 1 second")
    if args.time:
        time_s = parse_time(args.time)
        if args.signal_grace >= time_s:
            raise SubmitError(
                f"--signal-grace {args.signal_grace} s must be below the time "
                f"limit --time {args.time} ({time_s} s): the job checkpoints and requeues when "
                f"{SIGNAL} comes, that long before the limit"
            )
    if args.eval_limit is not None and args.eval_limit < 1:
        raise SubmitError("--eval-limit must be >= 1")
    if eval_dirs:
        parse_time(args.eval_time, "--eval-time")
    tasks_per_node = args.gpus_per_node or 1
    name = args.job_name or _job_name("evav-train-", run_dir.name)
    train_script = render(
        _template("train.sbatch"),
        {
            "job-name": name,
            "nodes": str(args.nodes),
            "ntasks-per-node": str(tasks_per_node),
            "gpus-per-node": str(args.gpus_per_node) if args.gpus_per_node else False,
            "cpus-per-task": _opt(args.cpus_per_task),
            "time": args.time,
            "partition": args.partition,
            "account": args.account,
            "signal": f"B:{SIGNAL}@{args.signal_grace}",
            "output": str(run_dir / "slurm-%j.out"),
            "requeue": "",
            "open-mode": "append",
        },
        args.sbatch,
        {"CONFIG": str(run_dir / "config.yaml"), "RUN_DIR": str(run_dir), **_python_env()},
    )
    eval_script = None
    if eval_dirs:
        eval_args = ["--limit", str(args.eval_limit)] if args.eval_limit else []
        eval_script = render(
            _template("eval.sbatch"),
            {
                "job-name": f"{args.job_name}-eval"
                if args.job_name
                else _job_name("evav-eval-", run_dir.name),
                "nodes": "1",
                "ntasks-per-node": str(tasks_per_node),
                "gpus-per-node": str(args.gpus_per_node) if args.gpus_per_node else False,
                "cpus-per-task": _opt(args.cpus_per_task),
                "time": args.eval_time,
                "partition": args.partition,
                "account": args.account,
                "output": str(run_dir / "eval" / "slurm-%j.out"),
            },
            args.sbatch,
            {"CHECKPOINT": str(run_dir), "DATA": ",".join(map(str, eval_dirs)), **_python_env()},
            script_args=eval_args,
        )

    train_path, eval_path = run_dir / "train.sbatch", run_dir / "eval.sbatch"
    if args.dry_run:
        print(f"# {run_dir / 'config.yaml'}\n{config_yaml}")
        _show(train_path, train_script, ["sbatch", "--parsable", str(train_path)])
        if eval_script:
            _show(
                eval_path,
                eval_script,
                ["sbatch", "--parsable", "--dependency=afterok:TRAIN_JOB", str(eval_path)],
            )
        return []

    sbatch = _sbatch_binary()
    # until sbatch takes the training job, a failure (sbatch refused, a bad option) undoes what
    # this submission wrote: a corrected retry (another config included) finds the run dir as
    # it was before
    with _undo_on_failure(run_dir, ["config.yaml", "train.sbatch", "eval", "code"]):
        (run_dir / "eval").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)
        snapshot = code_snapshot(run_dir / "code")
        train_path.write_text(train_script)
        job = submit(sbatch, train_path)
    print(
        f"submitted training job {job}: {args.nodes} node(s) x {tasks_per_node} task(s), "
        f"run dir {run_dir}, log {run_dir / f'slurm-{job}.out'}"
    )
    eval_job = None
    if eval_script:
        eval_path.write_text(eval_script)
        try:
            eval_job = submit(sbatch, eval_path, f"--dependency=afterok:{job}")
        except SubmitError as e:  # the training job is queued: it stays, and so does its config
            _record(run_dir, {"train_job": job, "eval_job": None, **snapshot})
            raise SubmitError(
                f"{e}; training job {job} was submitted and runs without it: fix the problem "
                f"and submit the evaluation with `sbatch --dependency=afterok:{job} {eval_path}`"
            ) from None
        print(
            f"submitted evaluation job {eval_job} (after job {job} succeeds): results in "
            f"{run_dir / 'eval'}"
        )
    _record(run_dir, {"train_job": job, "eval_job": eval_job, **snapshot})
    return [job] + ([eval_job] if eval_job else [])


@contextlib.contextmanager
def _undo_on_failure(run_dir: Path, names: list[str]) -> Iterator[None]:
    """On an exception, put back the run dir's entries ``names`` as they were before: remove
    those this block created (the run dir too, when it made it and left it empty) and rewrite
    the files it replaced (a folder's files included); then re-raise."""
    made_run_dir = not run_dir.exists()
    before: dict[str, dict[Path, bytes] | None] = {}
    for name in names:
        path = run_dir / name
        if path.is_dir():
            before[name] = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
        elif path.is_file():
            before[name] = {path: path.read_bytes()}
        else:
            before[name] = None
    try:
        yield
    except BaseException:
        for name, files in before.items():
            path = run_dir / name
            if files is None:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                elif path.exists() or path.is_symlink():
                    path.unlink()
                continue
            if path.is_dir():  # files the block added to a folder that was there
                for p in sorted(path.rglob("*"), reverse=True):
                    if p.is_file() and p not in files:
                        p.unlink()
            for p, data in files.items():
                p.write_bytes(data)
        if made_run_dir:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only when empty
        raise


def _check_same_run(run_dir: Path, config_yaml: str) -> None:
    """A run directory holds one run: resubmitting resumes it, with the same config only."""
    old = run_dir / "config.yaml"
    if not old.is_file():
        return
    import yaml

    before, after = _flat(yaml.safe_load(old.read_text()) or {}), _flat(yaml.safe_load(config_yaml))
    changed = [
        f"{k}: {before.get(k)!r} -> {after.get(k)!r}"
        for k in sorted(set(before) | set(after))
        if before.get(k) != after.get(k)
    ]
    if changed:
        raise SubmitError(
            f"{old}: this run directory holds a run with another config ({'; '.join(changed[:5])}"
            f"{'; ...' if len(changed) > 5 else ''}); use another --run-dir, or the same "
            "config and overrides to resume it"
        )


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _dataset_dir(path: str, what: str) -> Path:
    """An absolute dataset directory; it must hold the manifest.json of a finished build."""
    d = Path(path).expanduser().resolve()
    if not (d / "manifest.json").is_file():
        hint = "no such directory" if not d.exists() else "no manifest.json in it"
        raise SubmitError(f"{what}: {d}: {hint} (a dataset built by `evav preprocess`)")
    return d


# -- preprocessing -------------------------------------------------------------------------


def submit_preprocessing(args: argparse.Namespace) -> list[int]:
    """Render slurm/preprocess.sbatch into OUT/.slurm and submit the array and the merge."""
    from preprocessing.builders import builder_names, get_builder

    overrides = list(args.overrides)
    if args.config:  # the first key=value lands in the CONFIG positional
        if "=" not in args.config:
            raise SubmitError(f"give a training config ({args.config}) or --preprocess, not both")
        overrides.insert(0, args.config)
    for name in ("run_dir", "eval_data"):
        if getattr(args, name) is not None:
            raise SubmitError(f"--{name.replace('_', '-')} is for training only")
    if args.preprocess not in builder_names():
        raise SubmitError(
            f"--preprocess {args.preprocess}: unknown builder (known: {', '.join(builder_names())})"
        )
    if not args.out:
        raise SubmitError("--out DIR is required with --preprocess")
    if args.parts < 1:
        raise SubmitError("--parts must be >= 1")
    src = "-"
    if args.src:
        src_path = Path(args.src).expanduser().resolve()
        if not src_path.is_dir():
            raise SubmitError(f"--src {src_path}: no such directory")
        src = str(src_path)
    elif get_builder(args.preprocess).needs_src:
        raise SubmitError(
            f"--preprocess {args.preprocess} needs --src RAW (the raw dataset folder)"
        )
    if args.time:
        parse_time(args.time)
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise SubmitError("--cpus-per-task must be >= 1")
    out = _slurm_path("--out", Path(args.out).expanduser().resolve())
    extra = []
    if args.shard_samples is not None:
        extra += ["--shard-samples", str(args.shard_samples)]
    if args.codec:
        extra += ["--codec", args.codec]
    logs = out / ".slurm"
    name = args.job_name or _job_name("evav-preprocess-", out.name)
    script = render(
        _template("preprocess.sbatch"),
        {
            "job-name": name,
            "cpus-per-task": _opt(args.cpus_per_task),
            "time": args.time,
            "partition": args.partition,
            "account": args.account,
            "output": str(logs / "part-%A_%a.out"),
        },
        args.sbatch,
        _python_env(),
        script_args=[args.preprocess, src, str(out), *extra, *overrides],
    )
    path = logs / "preprocess.sbatch"
    array_opts = [f"--array=0-{args.parts - 1}"]
    merge_opts = [
        f"--job-name={name}-merge",
        "--cpus-per-task=1",
        f"--output={logs / 'merge-%j.out'}",
        "--export=ALL,EVAV_PREPROCESS_MERGE=1",
    ]
    if args.dry_run:
        _show(path, script, ["sbatch", "--parsable", *array_opts, str(path)])
        print(
            shlex.join(
                ["sbatch", "--parsable", "--dependency=afterok:ARRAY_JOB", *merge_opts, str(path)]
            )
        )
        return []
    sbatch = _sbatch_binary()
    logs.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    array = submit(sbatch, path, *array_opts)
    merge = submit(sbatch, path, f"--dependency=afterok:{array}", *merge_opts)
    print(
        f"submitted preprocessing job {array}: an array of {args.parts} parts building {out}, "
        f"logs in {logs}"
    )
    print(f"submitted merge job {merge} (after the whole array succeeds): {out / 'manifest.json'}")
    return [array, merge]


# -- rendering and submitting --------------------------------------------------------------


def render(
    template: str,
    directives: dict[str, str | bool | None],
    extra: list[str],
    exports: dict[str, str],
    script_args: list[str] | None = None,
) -> str:
    """The template with its ``#SBATCH`` block rewritten and the job's settings after it.

    ``directives``: option -> value ("" for a flag; None keeps the template's, False drops it);
    ``extra``:
    raw ``--option[=value]`` strings (``--sbatch``), applied last. ``exports`` become
    ``export NAME=value`` lines; ``script_args`` become the script's arguments unless the job is
    submitted with arguments of its own.
    """
    lines = template.splitlines()
    header = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    if not header:
        raise SubmitError("the template has no #SBATCH lines")
    first, last = header[0], header[-1]
    if header != list(range(first, last + 1)):
        raise SubmitError("the template's #SBATCH lines must be one block")
    options: dict[str, str | None] = {}
    for i in header:
        key, value = _split_option(lines[i].split(None, 1)[1].strip(), lines[i])
        options[key] = value
    updates = dict(directives)
    for key, value in directives.items():
        if isinstance(value, str):
            check_slurm_value(key, value, f"--{key}")
    for raw in extra:
        key, value = _split_option(raw, f"--sbatch={raw}")
        check_slurm_value(key, value, f"--sbatch=--{key}")
        if key in MEMORY_OPTIONS:
            updates.update({k: False for k in MEMORY_OPTIONS})
        updates[key] = value
    for key, value in updates.items():
        if value is False:
            options.pop(key, None)
        elif value is not None:
            options[key] = value
    block = [f"#SBATCH --{k}={v}" if v else f"#SBATCH --{k}" for k, v in options.items()]
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    settings = [f"# --- rendered by `evav submit` at {stamp}: this job's settings ---"]
    settings += [f"export {k}={shlex.quote(v)}" for k, v in exports.items()]
    if script_args:
        settings.append(f"[[ $# -gt 0 ]] || set -- {shlex.join(script_args)}")
    settings.append("# ---")
    return "\n".join(lines[:first] + block + settings + lines[last + 1 :]) + "\n"


def _split_option(text: str, where: str) -> tuple[str, str]:
    m = re.fullmatch(r"--([A-Za-z][A-Za-z0-9-]*)(?:=(.*))?", text, re.S)
    if not m:
        raise SubmitError(f"{where}: expected --option or --option=value")
    return m.group(1), m.group(2) or ""


def check_slurm_value(key: str, value: str, where: str) -> None:
    """Refuse a value for ``#SBATCH --KEY=VALUE`` that does not match ``SLURM_VALUES[KEY]`` (or
    the general pattern); ``where`` names the option in the message."""
    pattern, allowed = SLURM_VALUES.get(key, _ANY_VALUE)
    if re.fullmatch(pattern, value):
        return
    bad = sorted({c for c in value if not _SAFE_CHAR.fullmatch(c)})
    has = f" has {', '.join(map(repr, bad))};" if bad else ""
    raise SubmitError(
        f"{where} {value!r}:{has} not a value for an #SBATCH line (allowed: {allowed})"
    )


def _slurm_path(option: str, path: Path) -> Path:
    """A path that goes onto an #SBATCH line (the job's --output): checked like a value, and
    without % (Slurm's file name patterns: %j is the job id)."""
    if not re.fullmatch(rf"[{_PATH_CHARS}]+", str(path)):
        bad = sorted({c for c in str(path) if not re.fullmatch(rf"[{_PATH_CHARS}]", c)})
        raise SubmitError(
            f"{option} {str(path)!r}: has {', '.join(map(repr, bad))}; its path goes onto the "
            f"job's #SBATCH --output line, which takes only letters, digits and "
            f"_ . + , : = @ ~ / - (choose another directory)"
        )
    return path


def _job_name(prefix: str, name: str) -> str:
    """A default job name from a directory name, with what a job name cannot hold as _."""
    return prefix + re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def _refuse_credentials(cfg) -> None:
    """RUN/config.yaml is the job's config and is never to hold a secret (evav.metrics)."""
    plain, public = _flat(to_dict(cfg)), _flat(redacted_config(cfg))
    leaking = [k for k in plain if plain[k] != public[k]]
    if leaking:
        raise SubmitError(
            f"{leaking[0]}: {public[leaking[0]]!r} with credentials in the URI: evav never "
            "writes them into RUN/config.yaml or a job script. Give the URI without them and "
            "export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
            "MLFLOW_TRACKING_TOKEN) before submitting: sbatch passes the environment to the job "
            "(docs/operations.md, credentials)"
        )


def submit(sbatch: str, script: Path, *options: str) -> int:
    """``sbatch --parsable [options] SCRIPT`` (no shell), from the script's directory; the job id."""
    cmd = [sbatch, "--parsable", *options, str(script)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=script.parent)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SubmitError(f"{shlex.join(cmd)}: {e}") from None
    if done.returncode != 0:
        raise SubmitError(
            f"sbatch refused {script} (exit {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()}"
        )
    try:
        return int(done.stdout.strip().split(";")[0])
    except ValueError:
        raise SubmitError(f"sbatch printed no job id for {script}: {done.stdout!r}") from None


def _sbatch_binary() -> str:
    found = shutil.which("sbatch")
    if not found:
        raise SubmitError(
            "sbatch not found on PATH: run this where Slurm's clients are "
            "installed (a login node), or see what would be submitted with --dry-run"
        )
    return found


def _template(name: str) -> str:
    path = TEMPLATES / name
    try:
        return path.read_text()
    except OSError as e:
        raise SubmitError(
            f"template {path}: {e.strerror or e} (evav submit needs the slurm/ "
            "folder of an evav checkout)"
        ) from None


def _python_env() -> dict[str, str]:
    """Where the job finds evav: this Python, this checkout, and this working directory (for
    relative paths in the config)."""
    return {"EVAV_PYTHON": sys.executable, "EVAV_REPO": str(REPO), "EVAV_WORKDIR": os.getcwd()}


def _opt(value: int | None) -> str | None:
    return None if value is None else str(value)


def _show(path: Path, script: str, cmd: list[str]) -> None:
    print(f"# {path}\n{script}")
    print(shlex.join(cmd))


def parse_time(text: str, option: str = "--time") -> int:
    """A Slurm time limit in seconds: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (exactly:
    no spaces, as it goes onto an #SBATCH line)."""
    m = re.fullmatch(r"(?:([0-9]+)-)?([0-9]+)(?::([0-9]+))?(?::([0-9]+))?", text)  # ASCII digits
    if not m or text == "0":
        raise SubmitError(f"{option} {text!r}: expected e.g. 30 (minutes), 04:00:00 or 2-00:00:00")
    days, a, b, c = m.groups()
    nums = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        h, mi, s = (nums + [0, 0])[:3]
        return int(days) * 86400 + h * 3600 + mi * 60 + s
    if len(nums) == 1:
        return nums[0] * 60
    if len(nums) == 2:
        return nums[0] * 60 + nums[1]
    return nums[0] * 3600 + nums[1] * 60 + nums[2]


# -- the code version ----------------------------------------------------------------------


def code_snapshot(out: Path) -> dict:
    """Write the code version into ``out``: version.json, and for a git checkout diff.patch.

    diff.patch holds ``git diff HEAD`` (staged and unstaged changes) plus the untracked source
    files under evav/, preprocessing/, configs/, slurm/ and tools/ (up to 1 MiB each), so that
    ``git apply diff.patch`` on the commit gives back the tree that was submitted.
    """
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "evav_version": evav.__version__,
        "python": sys.version.split()[0],
        "submitted_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": redact_text(shlex.join(["evav", *sys.argv[1:]])),
        "repo": str(REPO),
    }
    commit = _git("rev-parse", "HEAD")
    top = _git("rev-parse", "--show-toplevel")
    if commit is not None and top is not None and Path(top).resolve() == REPO:
        diff = _git("diff", "--binary", "HEAD", strip=False) or ""
        skipped = []
        for rel in (
            _git("ls-files", "--others", "--exclude-standard", "-z", strip=False) or ""
        ).split("\0"):
            if not rel:
                continue
            path = REPO / rel
            if rel.split("/")[0] not in UNTRACKED_DIRS or path.stat().st_size > UNTRACKED_MAX_BYTES:
                skipped.append(rel)
                continue
            done = subprocess.run(
                ["git", "-C", str(REPO), "diff", "--binary", "--no-index", "/dev/null", rel],
                capture_output=True,
                text=True,
            )
            diff += done.stdout  # exit status 1: "they differ", as expected
        (out / "diff.patch").write_text(diff)
        info.update(
            {
                "git_commit": commit,
                "git_branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
                "git_dirty": bool(diff),
                "untracked_not_in_patch": len(skipped),
                "untracked_not_in_patch_examples": skipped[:10],
            }
        )
    (out / "version.json").write_text(json.dumps(info, indent=2) + "\n")
    return {k: info[k] for k in ("evav_version", "submitted_at", "command") if k in info} | {
        "git_commit": info.get("git_commit")
    }


def _git(*args: str, strip: bool = True) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() if strip else done.stdout


def _record(run_dir: Path, entry: dict) -> None:
    """One line per submission in RUN/submissions.jsonl (job ids, code version, command)."""
    with open(run_dir / "submissions.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
