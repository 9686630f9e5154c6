"""`evav submit` (evav/launch.py): what it renders, its errors, and a chained evaluation on the
real local Slurm cluster.

The --dry-run and error tests need no cluster: they call the CLI in this process. The last tests
submit to the ``slurm_cluster`` fixture (tests/slurm_fixtures.py; skipped without Slurm/root).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evav.cli import main
from evav.config import dump_yaml, load_config
from evav.launch import code_snapshot, parse_time, render
from evav.train import TrainConfig
from tests.slurm_fixtures import parse_scontrol_record
from tests.test_slurm_train import eval_result, evav_submit, slurm_shards  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "debug.yaml")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A tiny synthetic build (no cluster needed): only its manifest.json is read at submit."""
    out = tmp_path_factory.mktemp("launch") / "synthetic"
    assert (
        main(["preprocess", "synthetic", "--out", str(out), "train_per_task=2", "val_per_task=1"])
        == 0
    )
    return out


def submit_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["submit", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_dry_run_prints_the_rendered_jobs_and_writes_nothing(dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = submit_cli(
        capsys,
        CONFIG,
        f"data.train=[{dataset}]",
        "steps=7",
        "--run-dir",
        run_dir,
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--time",
        "1-00:00:00",
        "--partition",
        "gpu",
        "--account",
        "proj",
        "--signal-grace",
        "300",
        "--eval-data",
        dataset,
        "--eval-limit",
        "5",
        "--sbatch=--qos=high",
        "--dry-run",
    )
    assert code == 0, err
    assert not run_dir.exists()
    train, evaluation = out.split(f"# {run_dir / 'eval.sbatch'}\n")
    for line in [
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=1-00:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --signal=B:USR2@300",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --qos=high",
        f"#SBATCH --output={run_dir}/slurm-%j.out",
        f"export CONFIG={run_dir}/config.yaml",
        f"export RUN_DIR={run_dir}",
        f"export EVAV_PYTHON={sys.executable}",
        f"sbatch --parsable {run_dir}/train.sbatch",
    ]:
        assert line + "\n" in train, line
    assert train.count("#SBATCH --signal=") == 1  # the template's line was replaced, not added to
    config = yaml.safe_load(train.split(f"# {run_dir / 'config.yaml'}\n")[1].split("\n# ")[0])
    assert config["steps"] == 7 and config["run_dir"] == str(run_dir)
    assert config["data"]["train"] == [str(dataset)]
    for line in [
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --time=02:00:00",
        f"export CHECKPOINT={run_dir}",
        f"export DATA={dataset}",
        "[[ $# -gt 0 ]] || set -- --limit 5",
        f"sbatch --parsable --dependency=afterok:TRAIN_JOB {run_dir}/eval.sbatch",
    ]:
        assert line + "\n" in evaluation, line
    script = tmp_path / "train.sbatch"
    script.write_text(train.split(f"# {run_dir / 'train.sbatch'}\n")[1])
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_dry_run_of_a_preprocessing_array(tmp_path, capsys):
    out_dir = tmp_path / "shards"
    code, out, err = submit_cli(
        capsys,
        "--preprocess",
        "synthetic",
        "--out",
        out_dir,
        "--parts",
        "3",
        "--cpus-per-task",
        "2",
        "--shard-samples",
        "5",
        "train_per_task=4",
        "--sbatch=--mem=1G",
        "--dry-run",
    )
    assert code == 0, err
    assert not out_dir.exists()
    assert f"set -- synthetic - {out_dir} --shard-samples 5 train_per_task=4\n" in out
    assert "#SBATCH --cpus-per-task=2\n" in out and "#SBATCH --mem=1G\n" in out
    assert "--mem-per-cpu" not in out.split("set -euo")[0]  # one memory option only
    assert f"sbatch --parsable --array=0-2 {out_dir}/.slurm/preprocess.sbatch\n" in out
    assert "--dependency=afterok:ARRAY_JOB" in out and "EVAV_PREPROCESS_MERGE=1" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["configs/debug.yaml", "stepz=3"], "unknown config key 'stepz'; did you mean 'steps'?"),
        (["{tmp}/nosuch.yaml"], "config file {tmp}/nosuch.yaml: not found"),
        (["configs/debug.yaml", "data.train=[{missing}]"], "data.train: {missing}: no such dir"),
        (["configs/debug.yaml", "data.train=[{tmp}]"], "no manifest.json in it"),
        (["configs/debug.yaml"], "data.train is empty"),
        (["configs/debug.yaml", "DATA", "--time", "ten"], "--time 'ten': expected e.g. 30"),
        (
            ["configs/debug.yaml", "DATA", "--time", "2", "--signal-grace", "120"],
            "--signal-grace 120 s must be below the time limit --time 2 (120 s)",
        ),
        (["configs/debug.yaml", "DATA", "--eval-data", "{tmp}"], "--eval-data: {tmp}: no manif"),
        (["configs/debug.yaml", "DATA", "--sbatch=qos"], "--sbatch=qos: expected --option"),
        (["configs/debug.yaml", "DATA", "--src", "x"], "--src is for --preprocess builds only"),
        (["--preprocess", "nosuch", "--out", "{tmp}"], "--preprocess nosuch: unknown builder"),
        (["--preprocess", "fsdd", "--out", "{tmp}"], "--preprocess fsdd needs --src RAW"),
        (["--preprocess", "synthetic"], "--out DIR is required with --preprocess"),
        (["--preprocess", "synthetic", "--out", "{tmp}", "--run-dir", "r"], "for training only"),
    ],
)
def test_bad_submissions_are_clear_errors(dataset, tmp_path, capsys, args, message):
    fill = {"missing": tmp_path / "missing", "tmp": tmp_path}
    args = [
        CONFIG
        if a == "configs/debug.yaml"
        else f"data.train=[{dataset}]"
        if a == "DATA"
        else a.format(**fill)
        for a in args
    ]
    needs_run_dir = not any(a == "--preprocess" for a in args)
    code, out, err = submit_cli(
        capsys, *args, *(["--run-dir", tmp_path / "run"] * needs_run_dir), "--dry-run"
    )
    assert code == 2, out + err
    assert message.format(**fill) in err
    assert not (tmp_path / "run").exists()


def test_missing_sbatch_is_an_error_before_anything_is_written(
    dataset, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    code, _, err = submit_cli(
        capsys, CONFIG, f"data.train=[{dataset}]", "--run-dir", tmp_path / "run"
    )
    assert code == 2
    assert "sbatch not found on PATH" in err and "--dry-run" in err
    assert not (tmp_path / "run").exists()


def test_a_run_dir_refuses_another_config(dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data = f"data.train=[{dataset}]"
    dump_yaml(
        load_config(TrainConfig, CONFIG, [data, "steps=5", f"run_dir={run_dir}"]),
        run_dir / "config.yaml",
    )
    code, _, err = submit_cli(capsys, CONFIG, data, "steps=5", "--run-dir", run_dir, "--dry-run")
    assert code == 0, err  # the same config: resubmitting resumes the run
    code, _, err = submit_cli(capsys, CONFIG, data, "steps=9", "--run-dir", run_dir, "--dry-run")
    assert code == 2
    assert "holds a run with another config (steps: 5 -> 9)" in err


def test_code_snapshot_is_the_commit_and_a_patch_that_gives_this_tree(tmp_path):
    info = code_snapshot(tmp_path)
    version = json.loads((tmp_path / "version.json").read_text())
    assert version["evav_version"] == info["evav_version"]
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if head.returncode != 0:
        assert "git_commit" not in version  # not a checkout: the evav version only
        return
    assert version["git_commit"] == info["git_commit"] == head.stdout.strip()
    if version["git_dirty"]:  # reversing the patch applies cleanly: it is exactly the changes
        check = subprocess.run(
            ["git", "-C", str(REPO), "apply", "--check", "--reverse", str(tmp_path / "diff.patch")],
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stderr


def test_parse_time_and_render():
    assert [parse_time(t) for t in ("30", "5:30", "01:00:00", "2-00", "1-02:03", "1-00:00:01")] == [
        1800,
        330,
        3600,
        172800,
        93780,
        86401,
    ]
    template = "#!/bin/bash\n# about\n#SBATCH --time=1:00:00\n#SBATCH --mem=4G\nset -e\necho hi\n"
    text = render(
        template,
        {"time": "5", "nodes": "2", "mem": False},
        ["--qos=x"],
        {"RUN_DIR": "/a b"},
        ["x y", "z"],
    )
    assert text == (
        "#!/bin/bash\n# about\n#SBATCH --time=5\n#SBATCH --nodes=2\n#SBATCH --qos=x\n"
        + text.split("--qos=x\n")[1]
    )
    assert "export RUN_DIR='/a b'\n[[ $# -gt 0 ]] || set -- 'x y' z\n# ---\nset -e\n" in text


# -- hostile values: nothing given to `evav submit` adds a line to a script ----------------------

HOSTILE = [
    "gpu\ntouch PWNED",  # a newline ends the #SBATCH comment: the rest would be a command
    "gpu\r\ntouch PWNED",
    "$(touch PWNED)",
    "`touch PWNED`",
    "gpu;touch PWNED",
    "gpu && touch PWNED",
    "gpu|touch",
    "'gpu'",
    '"gpu"',
    "gpu#x",
    "gpu\\",
    "${HOME}",
    "gpu x",
    "\u0663",  # ARABIC-INDIC DIGIT THREE: a digit to Python regexes and int(), not to Slurm
]


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize(
    "option", ["--partition", "--account", "--job-name", "--time", "--eval-time", "--sbatch"]
)
def test_hostile_slurm_option_values_are_refused(dataset, tmp_path, capsys, option, value):
    args = [CONFIG, f"data.train=[{dataset}]", "--run-dir", tmp_path / "run", "--dry-run"]
    if option == "--sbatch":
        args.append(f"--sbatch=--qos={value}")
    else:
        args += [option, value]
    if option == "--eval-time":
        args += ["--eval-data", dataset]
    code, out, err = submit_cli(capsys, *args)
    assert code == 2, out
    if option in ("--time", "--eval-time"):
        assert f"{option} {value!r}: expected e.g. 30 (minutes), 04:00:00 or 2-00:00:00" in err
    else:
        where = "--sbatch=--qos" if option == "--sbatch" else option
        assert f"{where} {value!r}:" in err and "not a value for an #SBATCH line" in err, err
    assert "PWNED" not in out and not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["a|b", "node[01-04]", "gpu:a100:8", "ALL,FOO=1", "x&y"])
def test_generic_sbatch_values_slurm_needs_pass(dataset, tmp_path, capsys, value):
    code, out, err = submit_cli(
        capsys,
        CONFIG,
        f"data.train=[{dataset}]",
        "--run-dir",
        tmp_path / "run",
        f"--sbatch=--constraint={value}",
        "--partition",
        "gpu,debug",
        "--dry-run",
    )
    assert code == 0, err
    assert f"\n#SBATCH --constraint={value}\n" in out and "\n#SBATCH --partition=gpu,debug\n" in out


@pytest.mark.parametrize(
    "name", ["run\ntouch PWNED", "run$(touch PWNED)", "r`x`", "r;x", "r x", "r%j"]
)
def test_a_run_dir_that_cannot_go_onto_an_sbatch_line_is_refused(dataset, tmp_path, capsys, name):
    run_dir = tmp_path / name
    code, out, err = submit_cli(
        capsys, CONFIG, f"data.train=[{dataset}]", "--run-dir", run_dir, "--dry-run"
    )
    assert code == 2, out
    assert f"evav submit: error: --run-dir {str(run_dir)!r}: has " in err
    assert "#SBATCH --output line" in err and not run_dir.exists()
    code, out, err = submit_cli(capsys, "--preprocess", "synthetic", "--out", run_dir, "--dry-run")
    assert code == 2 and f"--out {str(run_dir)!r}: has " in err, out + err


def settings_words(script: str) -> list[str]:
    """The words of the settings `evav submit` put after the #SBATCH block (shlex, as bash
    reads them: a quoted value is one word whatever it holds)."""
    import shlex

    block = script.split("# --- rendered by `evav submit`", 1)[1].split("\nset -euo pipefail\n")[0]
    # without the marker lines around it (shlex takes the # of `$#` for a comment; bash not)
    return shlex.split(block.split("\n", 1)[1].rsplit("\n# ---", 1)[0])


def run_settings(script: str, cwd: Path) -> list[str]:
    """Run the settings block in bash and return what the job would see: the exported values
    and the script's arguments, NUL-separated (so a newline inside one stays inside it)."""
    block = script.split("# --- rendered by `evav submit`", 1)[1].split("\nset -euo pipefail\n")[0]
    code = block.split("\n", 1)[1] + '\nprintf "%s\\0" "$DATA" "$EVAV_WORKDIR" "$RUN_DIR" "$@"\n'
    done = subprocess.run(["bash", "-c", code, "job"], cwd=cwd, capture_output=True, check=True)
    return done.stdout.decode().split("\0")[:-1]


def test_hostile_paths_and_arguments_reach_the_job_as_single_words(
    dataset, tmp_path, capsys, monkeypatch
):
    """The eval data dir, the working directory, the preprocessing source, codec and builder
    options hold a newline, $(...), backticks and ;: the scripts stay valid bash, no command is
    added, and each value arrives as one word, unchanged."""
    evil = "d\n$(touch PWNED)`touch PWNED`;touch PWNED 'q\" x"
    data = tmp_path / f"data{evil}"
    data.mkdir()
    (data / "manifest.json").write_text((dataset / "manifest.json").read_text())
    cwd = tmp_path / f"cwd{evil}"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run_dir = tmp_path / "run=a~b"
    code, out, err = submit_cli(
        capsys,
        CONFIG,
        f"data.train=[{dataset}]",
        "--run-dir",
        run_dir,
        "--eval-data",
        data,
        "--dry-run",
    )
    assert code == 0, err
    train = out.split(f"# {run_dir / 'train.sbatch'}\n")[1].split(f"\n# {run_dir}/eval.sbatch")[0]
    evaluation = out.split(f"# {run_dir / 'eval.sbatch'}\n")[1].rsplit("\nsbatch --parsable", 1)[0]
    assert "#SBATCH --job-name=evav-train-run_a_b\n" in train  # = and ~ do not go into a name
    assert "#SBATCH --job-name=evav-eval-run_a_b\n" in evaluation
    for name, script in [("train", train), ("eval", evaluation)]:
        path = tmp_path / f"{name}.sbatch"
        path.write_text(script)
        subprocess.run(["bash", "-n", str(path)], check=True)
    assert f"EVAV_WORKDIR={cwd}" in settings_words(train)
    assert f"DATA={data}" in settings_words(evaluation)
    assert run_settings(evaluation, tmp_path)[:3] == [str(data), str(cwd), ""]
    assert run_settings(train, tmp_path)[1:3] == [str(cwd), str(run_dir)]

    src = tmp_path / f"src{evil}"
    src.mkdir()
    out_dir = tmp_path / "shards"
    code, out, err = submit_cli(
        capsys,
        "--preprocess",
        "synthetic",
        "--src",
        src,
        "--out",
        out_dir,
        "--codec",
        evil,
        f"train_per_task={evil}",
        "--dry-run",
    )
    assert code == 0, err
    script = out.split(f"# {out_dir}/.slurm/preprocess.sbatch\n")[1].rsplit("\nsbatch ", 2)[0]
    (tmp_path / "pre.sbatch").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "pre.sbatch")], check=True)
    args = ["synthetic", str(src), str(out_dir), "--codec", evil, f"train_per_task={evil}"]
    words = settings_words(script)
    assert words[words.index("--") + 1 :] == args
    assert run_settings(script, tmp_path)[3:] == args
    assert not list(tmp_path.rglob("PWNED")) and not list(cwd.rglob("PWNED"))


def test_credentials_in_the_config_are_refused_and_never_printed(dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    uri = "http://user:SeCrEt123@mlflow:5000/?token=SeCrEt123"
    code, out, err = submit_cli(
        capsys,
        CONFIG,
        f"data.train=[{dataset}]",
        f"metrics.tracking_uri={uri}",
        "--run-dir",
        run_dir,
        "--dry-run",
    )
    assert code == 2, out
    assert (
        "evav submit: error: metrics.tracking_uri: 'http://mlflow:5000/' with credentials in the "
        "URI: evav never writes them into RUN/config.yaml or a job script" in err
    )
    assert "MLFLOW_TRACKING_USERNAME" in err
    assert "SeCrEt123" not in out + err and not run_dir.exists()


def test_code_snapshot_records_the_command_without_credentials(tmp_path, monkeypatch):
    argv = ["evav", "train", "x.yaml", "metrics.tracking_uri=http://u:SeCrEt123@h:5000/?sig=S"]
    monkeypatch.setattr(sys, "argv", argv)
    info = code_snapshot(tmp_path)
    assert info["command"] == "evav train x.yaml 'metrics.tracking_uri=http://h:5000/'"
    assert "SeCrEt123" not in (tmp_path / "version.json").read_text()


# -- on the cluster ---------------------------------------------------------------------------


def test_sbatch_refusal_is_reported(slurm_cluster, slurm_shards, tmp_path):  # noqa: F811
    res, jobs = evav_submit(
        slurm_cluster,
        tmp_path,
        CONFIG,
        f"data.train=[{slurm_shards}]",
        "--run-dir",
        tmp_path / "run",
        "--partition",
        "nosuch",
        check=False,
    )
    assert res.returncode == 2 and not jobs, res.stdout + res.stderr
    assert "sbatch refused" in res.stderr and "nosuch" in res.stderr.lower(), res.stderr


def test_a_failed_submit_leaves_nothing_that_blocks_a_corrected_retry(
    slurm_cluster,
    slurm_shards,  # noqa: F811
    tmp_path,
):
    """sbatch refuses the job (an unknown partition, an option it does not know): the run dir
    is as before, so a retry with another config goes through; an existing run's files are
    put back byte for byte."""
    run_dir = tmp_path / "run"
    data = f"data.train=[{slurm_shards}]"
    for bad in (["--partition", "nosuch"], ["--sbatch=--no-such-option=1"]):
        res, jobs = evav_submit(
            slurm_cluster,
            tmp_path,
            CONFIG,
            data,
            "steps=5",
            "--run-dir",
            run_dir,
            *bad,
            check=False,
        )
        assert res.returncode == 2 and not jobs, res.stdout + res.stderr
        assert "sbatch refused" in res.stderr, res.stderr
        assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())
    # the corrected retry, with another config; held, so that it never runs
    res, jobs = evav_submit(
        slurm_cluster, tmp_path, CONFIG, data, "steps=6", "--run-dir", run_dir, "--sbatch=--hold"
    )
    try:
        assert len(jobs) == 1, res.stdout + res.stderr
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["steps"] == 6
        before = {
            str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()
        }
        assert {"config.yaml", "train.sbatch", "code/version.json"} <= set(before)
        # a failed resubmission of that run (here with another job option) changes nothing
        res, again = evav_submit(
            slurm_cluster,
            tmp_path,
            CONFIG,
            data,
            "steps=6",
            "--run-dir",
            run_dir,
            "--partition",
            "nosuch",
            check=False,
        )
        assert res.returncode == 2 and not again, res.stdout + res.stderr
        after = {
            str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()
        }
        assert after == before
    finally:
        for job in jobs:
            slurm_cluster.scancel(str(job))


def test_evaluation_job_runs_after_the_training_job(
    slurm_cluster,
    slurm_shards,  # noqa: F811
    tmp_path,
):
    """`evav submit ... --eval-data`: a 1-node training job, then (afterok) the evaluation of its
    last checkpoint; the run dir holds the config, the code version, both scripts, results."""
    run_dir = tmp_path / "run"
    res, jobs = evav_submit(
        slurm_cluster,
        tmp_path,
        CONFIG,
        f"data.train=[{slurm_shards}]",
        "steps=6",
        "micro_batch=4",
        "val_every=0",
        "log_every=1",
        "ckpt_every=3",
        f"metrics.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "--run-dir",
        run_dir,
        "--time",
        "10",
        "--eval-data",
        slurm_shards,
        "--eval-limit",
        "2",
        "--job-name",
        "test-eval",
    )
    assert len(jobs) == 2, res.stdout
    train_job, eval_job = jobs
    assert slurm_cluster.job(eval_job).get("Dependency", "").startswith(f"afterok:{train_job}")
    assert slurm_cluster.wait(eval_job, timeout=300) == "COMPLETED", slurm_cluster.describe(
        train_job
    ) + slurm_cluster.describe(eval_job)
    assert slurm_cluster.state(train_job) == "COMPLETED"
    done = {
        r["JobId"]: r
        for r in (
            parse_scontrol_record(line)
            for line in slurm_cluster.cluster.jobcomp_log.read_text().splitlines()
        )
    }
    assert done[str(eval_job)]["StartTime"] >= done[str(train_job)]["EndTime"]

    results = json.loads(eval_result(run_dir, slurm_shards, 6).read_text())
    assert results["step"] == 6
    assert results["checkpoint"] == str(run_dir / "checkpoints" / "step_00000006")
    assert sorted(results["tasks"]) == ["add", "count", "direction", "next", "pitch"]
    assert all(t["samples"] == 2 for t in results["tasks"].values()), results["tasks"]
    log = (run_dir / "eval" / f"slurm-{eval_job}.out").read_text()
    assert "results: " in log, log

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["steps"] == 6 and config["run_dir"] == str(run_dir)
    record = json.loads((run_dir / "submissions.jsonl").read_text())
    assert (record["train_job"], record["eval_job"]) == (train_job, eval_job)
    assert json.loads((run_dir / "code" / "version.json").read_text())["evav_version"]
