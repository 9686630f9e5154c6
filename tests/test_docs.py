"""The README cannot rot: every command it shows is run here at a tiny size, or is named here
with the test (or CI step) that runs it; and docs/config.md matches the config dataclasses.

Commands come from the README's fenced ``bash`` blocks (continuation lines joined, comments
dropped). Each must match exactly one rule below:

- ``RUN``: run in README order in a sandbox folder (``.venv``, ``configs``, ``tools``, ``slurm``
  linked from the repository), with the substitutions of ``SUBSTITUTE`` (``raw/...`` becomes a
  real dataset folder, a training checkpoint's step matches the tiny run) and the rule's extra
  arguments appended (fewer inputs, two training steps, ``--dry-run``); it must exit 0.
- ``COVERED``: commands that need a Slurm cluster, two processes, a set-up from scratch or a
  long-running server are run by the named test (which must exist) or by ``.ci/run`` (which
  must contain the command).

A rule that no command matches is an error too, so the tables follow the README.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import time

import pytest

from tests.conftest import REPO, datasets_root

README = REPO / "README.md"

# Tiny arguments appended to commands that run here (later key=value and flags win).
TINY_TRAIN = (
    "steps=2 micro_batch=2 log_every=1 val_every=0 ckpt_every=0 model.dim=32 "
    "model.depth=1 engine.precision=fp32 metrics.enabled=false"
)
RUN: dict[str, str] = {
    r"^\.venv/bin/evav render ": "",
    r"^\.venv/bin/evav preprocess --list$": "",
    r"^\.venv/bin/evav preprocess (synthetic|fsdd|audiomnist|sst2|cifar10|moving_mnist|text"
    r"|video) ": "--limit 5 --workers 1",
    r"^\.venv/bin/evav inspect ": "",
    r"^\.venv/bin/evav train ": TINY_TRAIN,
    r"^\.venv/bin/evav model-info$": "",
    r"^\.venv/bin/evav submit ": "--dry-run",
    r"^\.venv/bin/evav eval ": "--limit 2 --no-mlflow",  # MLflow: tests/test_demo.py
    r"^\.venv/bin/evav export ": "",
    r"^\.venv/bin/evav generate ": "",
    r"^\.venv/bin/evav tokenizer train ": "--vocab-size 300",
    r"^\.venv/bin/python tools/config_reference\.py$": "--out docs_config_check.md",
    r"^cut -f1 \.\./shared/datasets/sst2/train\.tsv ": "",
}

COVERED: dict[str, str] = {
    r"^make demo$": "tests/test_demo.py::test_make_demo_sets_up_then_runs_the_demo",
    r"^make test$": ".ci/run",
    r"^\.venv/bin/python tools/demo\.py --fresh$": "tests/test_demo.py::test_tiny_demo_prints_the_table_and_writes_its_files",
    r"^\.venv/bin/python tools/demo\.py --size tiny ": "tests/test_demo.py::test_tiny_demo_prints_the_table_and_writes_its_files",
    r"^\.venv/bin/evav preprocess clevrer ": "tests/test_preprocess.py::test_clevrer_question_parsing_with_stand_in_videos",
    r"^\.venv/bin/evav preprocess tinyvirat ": "tests/test_preprocess.py::test_tinyvirat_action_and_colorize_from_official_layout",
    r"^\.venv/bin/evav preprocess lasot ": "tests/test_preprocess.py::test_lasot_first_frame_box_then_boxed_frames",
    r"^\.venv/bin/torchrun --nproc_per_node 2 -m evav\.cli train ": "tests/test_train.py::test_two_process_zero_bf16_learns_fsdd_and_logs_to_mlflow_server",
    r"^\.venv/bin/torchrun --nproc_per_node 2 -m evav\.cli eval ": "tests/test_eval.py::test_eval_is_deterministic_and_the_same_with_two_processes",
    r"^\.venv/bin/mlflow ui ": "tests/test_demo.py::test_tiny_demo_prints_the_table_and_writes_its_files",
    r"^CONFIG=\S+ RUN_DIR=\S+ sbatch .*slurm/train\.sbatch": "tests/test_slurm_train.py::test_two_node_job_trains_to_the_end",
    r"^scancel --signal=USR2 ": "tests/test_slurm_train.py::test_usr2_checkpoints_requeues_and_resumes_in_the_same_run",
}

# README placeholders -> what exists here: real datasets in their official layouts, fixtures.
SUBSTITUTE = {
    "../shared/datasets/": "{datasets}/",
    "raw/fsdd": "{datasets}/fsdd",
    "raw/AudioMNIST": "{datasets}/audiomnist_samples",
    "raw/SST-2": "{datasets}/sst2",
    "raw/cifar10": "{datasets}/cifar10",
    "raw/mnist": "{datasets}/mnist",
    "raw/videos": "{datasets}/videos",
    "step_00000200": "step_00000002",  # the tiny training run has 2 steps
}


def readme_commands(text: str) -> list[str]:
    """Every command of the fenced bash blocks, in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            line = _strip_comment(line).strip()
            if line:
                commands.append(line)
    return commands


def _strip_comment(line: str) -> str:
    """The line without its ``# comment``: a ``#`` outside quotes that starts a word."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def rules_for(cmd: str) -> list[str]:
    return [r for r in (*RUN, *COVERED) if re.search(r, cmd)]


def test_every_readme_command_is_run_here_or_covered_by_a_named_test():
    commands = readme_commands(README.read_text())
    assert len(commands) > 20, "the README's bash blocks were not found"
    problems = []
    for cmd in commands:
        rules = rules_for(cmd)
        if len(rules) != 1:
            problems.append(
                f"{cmd!r} matches {len(rules)} rules {rules}; add one to RUN or COVERED"
            )
    for rule in (*RUN, *COVERED):
        if not any(re.search(rule, c) for c in commands):
            problems.append(f"rule {rule!r} matches no README command; remove it")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("rule", sorted(COVERED))
def test_covering_tests_exist(rule):
    target = COVERED[rule]
    if "::" not in target:  # a CI script that must contain the command
        cmd = next(c for c in readme_commands(README.read_text()) if re.search(rule, c))
        assert cmd in (REPO / target).read_text(), f"{target} does not run {cmd!r}"
        return
    path, name = target.split("::")
    tree = ast.parse((REPO / path).read_text())
    names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert name in names, f"{path} has no test {name} (it covers README commands {rule!r})"


def test_config_reference_is_up_to_date():
    from tools.config_reference import OUT, render

    assert OUT.read_text() == render(), (
        "docs/config.md is out of date: run .venv/bin/python tools/config_reference.py"
    )


def test_readme_links_point_to_files_that_exist():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text()):
        if "://" not in target:
            assert (REPO / target).exists(), f"README links to {target}, which does not exist"


@pytest.mark.slow
def test_readme_commands_run_at_a_tiny_size(tmp_path):
    datasets = datasets_root()
    if not (datasets / "README.md").is_file():
        pytest.skip(f"real datasets not found at {datasets} (set EVAV_DATASETS)")
    sandbox = tmp_path / "repo"
    sandbox.mkdir()
    for name in (".venv", "configs", "tools", "slurm"):
        (sandbox / name).symlink_to(REPO / name)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    took = []  # (seconds, command): printed with `pytest -s`, to keep this test fast
    for cmd in readme_commands(README.read_text()):
        rule = rules_for(cmd)[0]
        if rule not in RUN:
            continue
        for old, new in SUBSTITUTE.items():
            cmd = cmd.replace(old, new.format(datasets=datasets))
        cmd = f"{cmd} {RUN[rule]}".strip()
        t0 = time.monotonic()
        done = subprocess.run(
            ["bash", "-c", cmd], cwd=sandbox, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, (
            f"{cmd}\nexit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
        took.append((time.monotonic() - t0, cmd))
    print("\n".join(f"{t:6.1f} s  {c[:110]}" for t, c in took))
    assert len(took) >= 20
    assert (sandbox / "exports" / "debug" / "model.safetensors").is_file()
    assert (sandbox / "answer.png").is_file() and (sandbox / "tok.model").is_file()
