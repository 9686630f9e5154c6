"""Hostile data for `evav eval` and `evav generate`: a bad sample is skipped, counted with its
reason and logged, never a crash; a name from the data never becomes a path; text from the data
cannot break the report's markdown.

One debug model is trained per module (DeepSpeed ZeRO 2 on the CPU, 4 steps, as in
test_eval.py) on real synthetic shards. Each test copies the 15-sample validation split, damages
it the way a hostile user would (rewriting the real tar members), and runs `evav eval`
in-process through ``evav.cli.main``, or as a subprocess where the exit code and the absence of
a traceback are the point. Validation sample ``i`` is task ``ORDER[i % 5]``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from evav.eval.report import md_text, safe_name
from evav.manifest import clip_checksum

REPO = Path(__file__).resolve().parents[1]
TASKS = ["add", "count", "direction", "next", "pitch"]
ORDER = ["count", "pitch", "add", "next", "direction"]  # the synthetic builder's task order
PER_TASK = 3
TOTAL = PER_TASK * len(TASKS)
SHARD = Path("val") / "shard-000000.tar"


def evav_subprocess(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "evav.cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_eval")
    shards = root / "synthetic"
    for args in (
        ["preprocess", "synthetic", "--out", shards, "train_per_task=24", "val_per_task=3"],
        [
            "train",
            "configs/debug.yaml",
            f"data.train=[{shards}]",
            f"run_dir={root / 'run'}",
            "steps=4",
            "micro_batch=4",
            "log_every=2",
            "val_every=0",
            "ckpt_every=4",
            "engine.zero_stage=2",
        ],
    ):
        done = evav_subprocess(*args)
        assert done.returncode == 0, done.stderr[-3000:]
    return root, shards, root / "run"


@pytest.fixture
def data(trained, tmp_path):
    """A fresh copy of the shards to damage."""
    copy = tmp_path / "data"
    shutil.copytree(trained[1], copy)
    return copy


def run_eval(run, data, out: Path, capsys, *extra) -> tuple[int, str, str]:
    """`evav eval` in-process: (exit code, stdout, stderr)."""
    from evav.cli import main

    args = ["eval", run, "--data", data, "--out", out, "--quiet", *extra]
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def strict_json(path: Path) -> dict:
    """The results file, refusing NaN/Infinity (not JSON)."""

    def refuse(c):
        raise AssertionError(f"{path}: {c} written as a number")

    return json.loads(path.read_text(), parse_constant=refuse)


# -- damaging real shards ----------------------------------------------------------------------


def read_tar(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][ext] = tar.extractfile(info).read()
    return out


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def edit(data: Path, fn, keys=None) -> None:
    """Rewrite the split's shard with ``fn(members) -> members`` applied to ``keys`` (all)."""
    shard = data / SHARD
    samples = read_tar(shard)
    write_tar(
        shard,
        [(k, fn(dict(m)) if keys is None or k in keys else m) for k, m in samples],
    )


def keys_of(task: str) -> set[str]:
    return {f"{i:08d}" for i in range(TOTAL) if ORDER[i % 5] == task}


def meta_edit(change):
    """An edit of KEY.json's fields (``change(meta)`` mutates the dict)."""

    def fn(m):
        meta = json.loads(m["json"])
        change(meta)
        m["json"] = json.dumps(meta).encode()
        return m

    return fn


def raw_json(data: bytes):
    def fn(m):
        m["json"] = data
        return m

    return fn


def drop(ext):
    def fn(m):
        del m[ext]
        return m

    return fn


def flip_clip_byte(rehash: bool):
    """Flip one byte inside the FFV1 frame data (a slice CRC catches it); ``rehash``: update
    ``clip_sha256`` too, so only the decoder can tell."""

    def fn(m):
        clip = bytearray(m["mp4"])
        clip[clip.index(b"mdat") + 60] ^= 0xFF
        m["mp4"] = bytes(clip)
        if rehash:
            meta = json.loads(m["json"])
            meta["clip_sha256"] = clip_checksum(m["mp4"])
            m["json"] = json.dumps(meta).encode()
        return m

    return fn


def one_more_frame(meta):
    meta["num_frames"] += 1
    meta["segments"]["input"] += 1


def set_fields(**fields):
    return meta_edit(lambda meta: meta.update(fields))


def del_field(name):
    return meta_edit(lambda meta: meta.pop(name))


# (id, key damaged, edit, reason, task the skip is counted for (None: unknown), message part)
ONE_BAD_SAMPLE = [
    ("json-a-list", "00000000", raw_json(b"[1, 2]"), "bad_metadata", None, "got list"),
    ("json-null", "00000000", raw_json(b"null"), "bad_metadata", None, "got NoneType"),
    ("json-empty", "00000000", raw_json(b""), "bad_metadata", None, "not JSON"),
    (
        "json-not-utf8",
        "00000000",
        raw_json(b'{"key": "\xff\xfe"}'),
        "bad_metadata",
        None,
        "not JSON",
    ),
    (
        "json-deeply-nested",
        "00000000",
        raw_json(b"[" * 200_000 + b"]" * 200_000),
        "bad_metadata",
        None,
        "RecursionError",
    ),
    (
        "json-missing-field",
        "00000000",
        del_field("clip_sha256"),
        "bad_metadata",
        "count",
        "missing field(s) clip_sha256",
    ),
    (
        "json-unknown-field",
        "00000000",
        set_fields(evil=1),
        "bad_metadata",
        "count",
        "unknown field(s) evil",
    ),
    (
        "json-wrong-type",
        "00000000",
        set_fields(num_frames="4"),
        "bad_metadata",
        "count",
        "num_frames is str, not int",
    ),
    (
        "json-segments-do-not-sum",
        "00000000",
        set_fields(segments={"task": 1, "input": 1}),
        "bad_metadata",
        "count",
        "segments sum to 2, num_frames is 4",
    ),
    (
        "json-negative-segment",
        "00000000",
        set_fields(segments={"task": 1, "input": 5, "separator": 1, "output": -3}),
        "bad_metadata",
        "count",
        "are not frame counts",
    ),
    ("no-KEY.mp4", "00000000", drop("mp4"), "missing_member", "count", "needs KEY.mp4"),
    ("no-KEY.json", "00000000", drop("json"), "missing_member", None, "has ['mp4']"),
    (
        "flipped-clip-byte",
        "00000000",
        flip_clip_byte(rehash=False),
        "checksum",
        "count",
        "clip checksum mismatch",
    ),
    (
        "flipped-clip-byte-rehashed",
        "00000000",
        flip_clip_byte(rehash=True),
        "decode",
        "count",
        "slice CRC mismatch",
    ),
    (
        "other-render-hash",
        "00000000",
        set_fields(render_hash="0" * 64),
        "render_hash",
        "count",
        "rendered with hash '0000000000000000'",
    ),
    (
        "frame-count-mismatch",
        "00000000",
        meta_edit(one_more_frame),
        "frame_count",
        "count",
        "decoded 4 frames, metadata says 5",
    ),
    (
        "segments-leave-no-answer",
        "00000003",  # next: a video answer; one 8-frame "task" segment leaves nothing to predict
        set_fields(segments={"task": 8}),
        "segments",
        "next",
        "a prompt of 11 frames",
    ),
    (
        "tracking-boxes-not-boxes",
        "00000003",
        set_fields(task="lasot", extra={"boxes": [5] * 10}),
        "readout",
        "lasot",
        "TypeError",
    ),
    (
        "open-task-without-answers",
        "00000003",
        set_fields(task="clevrer"),  # "next" has no answer: no vocabulary to read it with
        "task_reader",
        "clevrer",
        "no answer words",
    ),
]


@pytest.mark.parametrize(
    "key,damage,reason,task,why",
    [pytest.param(*c[1:], id=c[0]) for c in ONE_BAD_SAMPLE],
)
def test_one_bad_sample_is_skipped_and_counted_with_its_reason(
    trained, data, tmp_path, capsys, caplog, key, damage, reason, task, why
):
    _, _, run = trained
    edit(data, damage, {key})
    out = tmp_path / "r.json"
    with caplog.at_level(logging.WARNING, logger="evav.eval"):
        rc, stdout, _ = run_eval(run, data, out, capsys, "--no-mlflow")
    assert rc == 0
    r = strict_json(out)
    assert r["skipped"] == {reason: 1} and r["skipped_total"] == 1
    (bad,) = r["skipped_samples"]
    assert bad["where"] == f"{data / SHARD} key '{key}'"
    assert (bad["reason"], bad["task"]) == (reason, task) and why in bad["why"], bad
    damaged = ORDER[int(key) % 5]
    for t in TASKS:
        m = r["tasks"][t]
        assert m["samples"] == PER_TASK - (t == damaged)
        assert m["skipped"] == ({reason: 1} if t == task else {}), (t, m)
    if task not in (None, *TASKS):  # a task made up by the damage: an entry with 0 evaluated
        assert r["tasks"][task]["samples"] == 0
        assert r["tasks"][task]["skipped"] == {reason: 1}
    # the other samples of the batch were evaluated all the same
    assert len(r["predictions"]) == TOTAL - 1
    assert key not in {p["key"] for p in r["predictions"]}
    # said in the CLI output, in the report, and in the log with shard and key
    assert f"skipped 1 bad sample(s): {reason} 1" in stdout
    report = (out.with_name("r_report") / "report.md").read_text()
    assert "## Skipped samples (1)" in report and f"| {md_text(reason)} |" in report
    logged = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert any(str(data / SHARD) in m and key in m and reason in m for m in logged), logged


def test_truncated_shard_counts_every_missing_sample_and_logs_a_few(
    trained, data, tmp_path, capsys, caplog
):
    _, _, run = trained
    shard = data / SHARD
    with tarfile.open(shard) as tar:
        cut = tar.getmember("00000009.mp4").offset_data + 100  # inside sample 9's clip
    shard.write_bytes(shard.read_bytes()[:cut])
    out = tmp_path / "r.json"
    with caplog.at_level(logging.WARNING, logger="evav.eval"):
        rc, stdout, _ = run_eval(run, data, out, capsys, "--no-mlflow", "--no-report")
    assert rc == 0
    r = strict_json(out)
    assert r["skipped"] == {"missing_sample": 6} and r["skipped_total"] == 6
    wheres = [s["where"] for s in r["skipped_samples"]]
    assert wheres == [f"{shard} key '00000009'"] + [f"{shard} sample #{i}" for i in range(10, 15)]
    assert all(s["task"] is None for s in r["skipped_samples"])
    assert "unexpected end of data" in r["skipped_samples"][-1]["why"]
    assert sum(m["samples"] for m in r["tasks"].values()) == 9
    assert all(m["skipped"] == {} for m in r["tasks"].values())
    assert "skipped 6 bad sample(s): missing_sample 6" in stdout
    # rate-limited: five in full, then one line saying the rest are only counted
    logged = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    full = [m for m in logged if m.startswith("skipped ") and "(missing_sample)" in m]
    assert len(full) == 5 and all(str(shard) in m for m in full)
    assert sum("further samples skipped for missing_sample" in m for m in logged) == 1


@pytest.mark.parametrize(
    "damage,reason,kind",
    [
        pytest.param(flip_clip_byte(rehash=False), "checksum", "classification", id="clips"),
        pytest.param(set_fields(num_frames="4"), "bad_metadata", None, id="metadata"),
    ],
)
def test_a_task_whose_samples_are_all_bad_gets_a_clear_entry(
    trained, data, tmp_path, capsys, damage, reason, kind
):
    _, _, run = trained
    edit(data, damage, keys_of("pitch"))
    out = tmp_path / "r.json"
    rc, stdout, _ = run_eval(run, data, out, capsys, "--no-mlflow")
    assert rc == 0
    r = strict_json(out)
    pitch = r["tasks"]["pitch"]
    assert pitch["samples"] == 0 and pitch["kind"] == kind
    assert pitch["skipped"] == {reason: PER_TASK} and pitch["skipped_total"] == PER_TASK
    assert "accuracy" not in pitch and "confusion" not in pitch
    assert all(r["tasks"][t]["samples"] == PER_TASK for t in TASKS if t != "pitch")
    metric = "accuracy" if kind else "?"
    row = f"| pitch | {kind or '?'} | 0 | {PER_TASK} ({md_text(reason)} {PER_TASK}) | {metric} | "
    assert row + "not evaluated |" in stdout
    report = (out.with_name("r_report") / "report.md").read_text()
    assert row in report and "not evaluated" in report
    assert not list((out.with_name("r_report") / "examples").glob("pitch*"))


@pytest.mark.parametrize(
    "damage,reason,why",
    [
        pytest.param(
            flip_clip_byte(rehash=False), "checksum", "clip checksum mismatch", id="clips"
        ),
        pytest.param(
            raw_json(b"[]"), "bad_metadata", "expected an object, got list", id="metadata"
        ),
    ],
)
def test_all_samples_bad_is_one_clear_error(trained, data, tmp_path, damage, reason, why):
    _, _, run = trained
    edit(data, damage)
    out = tmp_path / "r.json"
    done = evav_subprocess("eval", run, "--data", data, "--out", out, "--quiet", "--no-mlflow")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("evav eval: error:")]
    assert line.startswith(
        f"evav eval: error: no sample of split 'val' of {data} could be evaluated: all "
        f"{TOTAL} skipped, most often {reason} ({TOTAL}), e.g. {data / SHARD} key '00000000': "
    )
    assert why in line
    assert not out.exists() and not out.with_name("r_report").exists()


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()}


def test_task_names_from_data_never_become_paths_or_break_the_report(
    trained, data, tmp_path, capsys
):
    root, _, run = trained
    names = {
        "count": "../../x",
        "pitch": str(tmp_path / "abs" / "y"),  # absolute: would escape the report folder
        "add": "a|b\nc [x](http://evil/t.png) <b>",
        "direction": "..",
    }
    for task, name in names.items():
        edit(data, set_fields(task=name), keys_of(task))
    out, rdir = tmp_path / "out" / "r.json", tmp_path / "out" / "report"
    before = files_under(tmp_path)
    rc, stdout, _ = run_eval(run, data, out, capsys, "--report", rdir)
    assert rc == 0
    new = files_under(tmp_path) - before
    shown = {*names.values(), "next"}
    examples = {rdir / "examples" / f"{safe_name(t)}_{i}.png" for t in shown for i in (0, 1)}
    assert new == {out, rdir / "report.md", *examples}
    assert not (tmp_path / "abs").exists() and not (tmp_path / "x_0.png").exists()
    r = strict_json(out)
    assert set(r["tasks"]) == shown and all(m["samples"] == PER_TASK for m in r["tasks"].values())
    # every table row keeps its 10 cell borders: | and newlines from the data are escaped
    report = (rdir / "report.md").read_text()
    for text in (stdout, report):
        rows = [x for x in text.splitlines() if x.startswith("| ") and "classification" in x]
        assert len(rows) == 4, text
        assert all(len(re.findall(r"(?<!\\)\|", x)) == 10 for x in rows), rows
    cell = md_text(names["add"])
    assert cell == r"a\|b\\u000ac \[x\](http://evil/t.png) \<b\>" and f"| {cell} |" in report
    assert "[x](" not in report and "<b>" not in report  # no link, no HTML
    # MLflow: metric keys (eval/DATASET/SPLIT/TASK/METRIC) and artifact names are safe names
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    run_id = (run / "mlflow_run_id").read_text().strip()
    metrics = client.get_run(run_id).data.metrics
    for name in names.values():
        assert f"eval/data/val/{safe_name(name)}/accuracy" in metrics
    listed = client.list_artifacts(run_id, "eval/data/val/step_00000004/report/examples")
    assert {Path(a.path).name for a in listed} == {p.name for p in examples}


# -- safe names and markdown, no model ---------------------------------------------------------


HOSTILE_NAMES = {
    "parent-traversal": "../../x",
    "absolute": "/abs",
    "slash": "a/b",
    "dotdot": "..",
    "dot": ".",
    "empty": "",
    "nul": "a\0b",
    "newline": "a\nb",
    "300-chars": "x" * 300,
    "unicode": "größe-日本",
    "surrogate": "a\ud800b",
    "backslash": "a\\b",
    "leading-dash": "-rf",
    "hidden": ".bashrc",
    "trailing-dot": "a.",
    "windows-device": "NUL",
    "uppercase": "Add",
}


@pytest.mark.parametrize("name", list(HOSTILE_NAMES.values()), ids=list(HOSTILE_NAMES))
def test_safe_name_is_one_harmless_file_name_component(name, tmp_path):
    s = safe_name(name)
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,80}", s), s
    assert s not in (".", "..") and s[0] not in ".-" and not s.endswith(".")
    assert s != name  # each of these had to change, so it carries its hash
    assert s.endswith("-" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16])
    assert safe_name(name) == s  # stable
    (tmp_path / s).write_text("x")  # a file name the OS takes, directly inside the folder
    assert [p.name for p in tmp_path.iterdir()] == [s]


def test_safe_name_keeps_safe_names_and_never_merges_two():
    for ok in ("add", "count", "fsdd", "moving_mnist", "sst2.v2", "a-b"):
        assert safe_name(ok) == ok
    alike = ["a/b", "a\\b", "a b", "a_b", "a\nb", "A_b", "a_B"]
    assert len({safe_name(n) for n in alike}) == len(alike)
    assert len({safe_name(n).lower() for n in alike}) == len(alike)  # case-insensitive disks
    # a safe name shaped like a hashed one is hashed again, so it cannot take another's place
    forged = safe_name("a/b")
    assert safe_name(forged) != forged
    long = ["x" * 300, "x" * 301, "x" * 80 + "y"]
    assert len({safe_name(n) for n in long}) == 3


def test_md_text_escapes_markdown_html_and_control_characters():
    assert md_text("add") == "add"
    assert md_text("a|b") == r"a\|b"
    assert md_text("a\nb\rc") == r"a\\u000ab\\u000dc"
    assert md_text("**x** _y_ `z`") == r"\*\*x\*\* \_y\_ \`z\`"
    assert md_text("<img src=x>") == r"\<img src=x\>"
    assert md_text("\u202eevil") == r"\\u202eevil"  # right-to-left override
    assert md_text("a\ud800") == r"a\\ud800"  # an unpaired surrogate, which utf-8 cannot write
    assert md_text("y" * 500) == "y" * 200 + "..."


def test_metrics_without_a_finite_value_are_null_and_flagged(tmp_path):
    from evav.eval.report import summary_table, write_results
    from evav.eval.run import _finite

    nan, inf = float("nan"), float("inf")
    metrics, undefined = _finite({"psnr": nan, "psnr_per_frame": [31.5, inf], "ssim": 0.5})
    assert metrics == {"psnr": None, "psnr_per_frame": [31.5, None], "ssim": 0.5}
    assert undefined == ["psnr", "psnr_per_frame[1]"]
    task = {"kind": "video_prediction", "samples": 2, "skipped": {}, "skipped_total": 0}
    results = {"tasks": {"next": {**task, **metrics, "undefined": undefined}}, "x": nan}
    assert strict_json(write_results(results, tmp_path / "r.json"))["x"] is None
    assert "| next | video_prediction | 2 | 0 | psnr | n/a |" in summary_table(results)


# -- evav generate with bad input files --------------------------------------------------------


@pytest.mark.parametrize(
    "name,content,message",
    [
        pytest.param("bad.png", b"\x89PNG\r\n\x1a\nnot really", "corrupt or truncated", id="png"),
        pytest.param("empty.png", b"", "empty", id="empty-png"),
        pytest.param("bad.wav", b"RIFF\x00\x00\x00\x00WAVEjunk", "audio", id="wav"),
        pytest.param("bad.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64, "video", id="mp4"),
        pytest.param("bad.xyz", b"whatever", "cannot tell the modality", id="unknown-suffix"),
    ],
)
def test_generate_with_a_bad_input_file_is_one_error_line(
    trained, tmp_path, capsys, name, content, message
):
    from evav.cli import main

    _, _, run = trained
    src = tmp_path / name
    src.write_bytes(content)
    out = tmp_path / "g.png"
    rc = main(["generate", str(run), "--task", "add", "--input", str(src), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists() and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("evav generate: error: ")]
    assert str(src) in line and message in line


def test_generate_errors_in_a_subprocess_have_no_traceback(trained, tmp_path):
    _, _, run = trained
    src = tmp_path / "bad.mp4"
    src.write_bytes(b"\x00" * 100)
    nodata = tmp_path / "nodata"
    nodata.mkdir()
    common = ["generate", run, "--task", "add", "--out", tmp_path / "g.png"]
    for extra in (["--input", src], ["--input", "two plus two", "--data", nodata]):
        done = evav_subprocess(*common, *extra)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        (line,) = [x for x in done.stderr.splitlines() if x.startswith("evav generate: error: ")]
        assert str(src if extra[1] == src else nodata) in line
        assert done.stderr.rstrip().endswith(line)  # the last thing said
