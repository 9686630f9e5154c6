"""Builders that need no code (imagefolder, audiofolder, jsonl) and builders from outside the
repository (MODULE:CLASS, entry points in the group ``evav.builders``).

Raw folders are made here (images with Pillow, WAVs with numpy and the wave module), built
through `evav preprocess`, compared with direct renders and checked by `evav inspect --verify`.
Each build mixes good inputs with hostile ones (an unreadable image, a silent clip, bad JSON
lines, missing files, paths and symbolic links leading out of --src): those are quarantined with
their FILE[:LINE] and reason, the rest is built. Nothing read from disk runs code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evav.cli import main
from evav.frames import RenderSpec, TextRenderer, build_clip, render_audio, render_image
from evav.manifest import Manifest, load_manifest
from preprocessing.builders import builder_names, get_builder
from tests.test_preprocess import read_samples

SPEC = RenderSpec()
TEXT = TextRenderer(SPEC)
REPO = Path(__file__).resolve().parents[1]


# -- makers --------------------------------------------------------------------------------------
def image(path: Path, colour: tuple[int, int, int], size=(20, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:, : size[0] // 2] = colour  # left half coloured, right half black
    Image.fromarray(a).save(path)
    return path


def wav(path: Path, hz: float, amplitude: float = 0.5, rate: int = 8000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(0.3 * rate)) / rate
    pcm = np.round(amplitude * 32767 * np.sin(2 * np.pi * hz * t)).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def build(builder: str, src: Path, out: Path, *extra: str) -> Manifest:
    assert main(["preprocess", builder, "--src", str(src), "--out", str(out), *extra]) == 0
    return load_manifest(out)


def fails(capsys, builder: str, src: Path, out: Path, *extra: str) -> str:
    capsys.readouterr()
    assert main(["preprocess", builder, "--src", str(src), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def verified(out: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["inspect", str(out), "--verify"]) == 0, capsys.readouterr().out


def quarantine(m: Manifest, root: Path) -> dict[str, str]:
    return {os.path.relpath(q.source, root): q.reason for q in m.quarantined}


def check_counts(m: Manifest) -> None:
    for name, s in m.splits.items():
        assert s.inputs == s.samples + sum(q.split == name for q in m.quarantined)


# -- imagefolder -------------------------------------------------------------------------------
def test_imagefolder_builds_labels_as_answers_and_quarantines_hostile_files(tmp_path, capsys):
    raw, outside = tmp_path / "raw", tmp_path / "outside"
    for split, n in (("train", 3), ("test", 1)):
        for label, colour in (("cat", (200, 30, 30)), ("dog", (30, 200, 30))):
            for i in range(n):
                image(raw / split / label / f"{i}.png", colour)
    image(raw / "train" / "dog" / "BIG.JPG", (0, 0, 250))  # a suffix in capitals
    (raw / "train" / "dog" / "notes.txt").write_text("not an image suffix: ignored")
    (raw / "train" / "dog" / ".hidden.png").write_bytes(b"hidden: ignored")
    (raw / "train" / "cat" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    image(outside / "secret.png", (255, 255, 255))
    (raw / "train" / "cat" / "escape.png").symlink_to(outside / "secret.png")
    (raw / "train" / "cat" / "inside.png").symlink_to(raw / "train" / "cat" / "0.png")
    image(raw / "train" / "loose.png", (9, 9, 9))

    m = build("imagefolder", raw, tmp_path / "out", "task=pets", "--shard-samples", "3")
    check_counts(m)
    q = quarantine(m, raw)
    assert q.pop("train/cat/garbage.png").startswith("not an image evav reads")
    assert q.pop("train/cat/escape.png") == (
        f"symbolic link out of --src (to {outside.resolve() / 'secret.png'})"
    )
    assert q.pop("train/loose.png") == "not inside a label folder train/{label}/"
    assert not q
    assert m.splits["train"].samples == 8 and m.splits["test"].samples == 2
    assert m.splits["train"].tasks == {"pets": 8}
    for meta, frames in read_samples(tmp_path / "out").values():
        assert meta.answer == meta.label == Path(meta.source).parent.name
        direct = build_clip(
            TEXT, "pets", render_image(meta.source, SPEC), TEXT.render_text(meta.answer)
        )
        assert np.array_equal(frames, direct.frames)  # ffv1: exact
    verified(tmp_path / "out", capsys)


def test_imagefolder_limit_is_stratified_by_label(tmp_path):
    raw = tmp_path / "raw"
    for label, n in (("a", 18), ("b", 6), ("c", 1)):
        for i in range(n):
            image(raw / "train" / label / f"{i:02d}.png", (10 * i, 0, 0))
    build("imagefolder", raw, tmp_path / "out", "--limit", "8")
    labels = sorted(meta.label for meta, _ in read_samples(tmp_path / "out").values())
    assert labels == ["a"] * 5 + ["b"] * 2 + ["c"]


def test_imagefolder_layout_errors_stop_before_any_work(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "train" / "cat").mkdir(parents=True)
    assert "expected {split}/{label}/FILE with FILE ending in" in fails(
        capsys, "imagefolder", empty, tmp_path / "o1"
    )
    raw, elsewhere = tmp_path / "raw", tmp_path / "elsewhere"
    image(raw / "train" / "cat" / "0.png", (1, 2, 3))
    image(elsewhere / "0.png", (1, 2, 3))
    (raw / "train" / "dog").symlink_to(elsewhere)
    err = fails(capsys, "imagefolder", raw, tmp_path / "o2")
    assert f"train/dog/: symbolic link out of --src (to {elsewhere.resolve()})" in err
    assert "task must be a non-empty name" in fails(
        capsys, "imagefolder", raw, tmp_path / "o3", "task= "
    )
    (raw / "train" / "dog").unlink()
    (raw / "val").symlink_to(elsewhere)
    err = fails(capsys, "imagefolder", raw, tmp_path / "o4")
    assert f"val/: symbolic link out of --src (to {elsewhere.resolve()})" in err
    assert not any((tmp_path / o).exists() for o in ("o2", "o3", "o4"))


# -- audiofolder -------------------------------------------------------------------------------
def test_audiofolder_builds_spectrograms_with_label_answers(tmp_path, capsys):
    raw = tmp_path / "raw"
    for split in ("train", "val"):
        for label, hz in (("low", 300.0), ("high", 2500.0)):
            for i in range(2):
                wav(raw / split / label / f"{i}.wav", hz * (1 + 0.1 * i))
    wav(raw / "train" / "low" / "quiet.wav", 300.0, amplitude=0.0)
    (raw / "train" / "high" / "empty.WAV").write_bytes(b"")
    (raw / "train" / "high" / "dangling.wav").symlink_to(raw / "train" / "high" / "gone.wav")

    m = build("audiofolder", raw, tmp_path / "out")
    check_counts(m)
    q = quarantine(m, raw)
    assert q.pop("train/low/quiet.wav").startswith("silent: peak amplitude")
    assert q.pop("train/high/empty.WAV") == "empty file (0 bytes)"
    assert q.pop("train/high/dangling.wav").startswith("dangling symbolic link")
    assert not q
    assert m.splits["train"].samples == m.splits["val"].samples == 4
    assert m.splits["val"].tasks == {"audiofolder": 4}
    for meta, frames in read_samples(tmp_path / "out").values():
        assert meta.answer == Path(meta.source).parent.name
        direct = build_clip(
            TEXT, "audiofolder", render_audio(meta.source, SPEC), TEXT.render_text(meta.answer)
        )
        assert np.array_equal(frames, direct.frames)
    verified(tmp_path / "out", capsys)


# -- jsonl -----------------------------------------------------------------------------------------
def test_jsonl_text_image_and_audio_inputs_and_every_bad_line(tmp_path, capsys):
    raw, outside = tmp_path / "raw", tmp_path / "outside"
    image(raw / "img" / "red.png", (220, 0, 0))
    wav(raw / "snd" / "tone.wav", 440.0)
    image(outside / "x.png", (0, 0, 0))
    (raw / "img" / "out.png").symlink_to(outside / "x.png")
    lines = [
        {"input": "the movie was great", "answer": "positive", "task": "sentiment"},  # 1
        {"input": "img/red.png", "answer": "red"},  # 2
        {"input": "snd/tone.wav", "answer": "a tone", "task": "sound"},  # 3
        {"input": "img/red.png", "answer": "a file name", "kind": "text"},  # 4
        "{not json",  # 5
        [1, 2],  # 6
        {"input": "no answer"},  # 7
        {"input": "/etc/passwd.png", "answer": "x"},  # 8
        {"input": "../outside/x.png", "answer": "x"},  # 9
        {"input": "img/out.png", "answer": "x"},  # 10
        {"input": "img/missing.png", "answer": "x"},  # 11
        {"input": "img/red.png", "answer": "x", "kind": "hologram"},  # 12
        {"input": " \t ", "answer": "empty text"},  # 13
        {"input": "fine", "answer": "", "task": "t"},  # 14
        {"input": "x", "answer": "y", "task": 7},  # 15
    ]
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines)
    (raw / "train.jsonl").write_bytes(text.encode() + b"\n\n   \n\xff\xfe\n")  # 16, 17: blank; 18
    (raw / "test.jsonl").write_text(json.dumps({"input": "how many", "answer": "two"}) + "\r\n")

    m = build("jsonl", raw, tmp_path / "out", "task=qa")
    check_counts(m)
    q = quarantine(m, raw)
    expected = {
        "train.jsonl:5": "not a JSON object: JSONDecodeError",
        "train.jsonl:6": "not a JSON object: a JSON list",
        "train.jsonl:7": "field 'answer' is missing or not a string",
        "train.jsonl:8": "input '/etc/passwd.png' is not a relative path inside --src",
        "train.jsonl:9": "input '../outside/x.png' is not a relative path inside --src",
        "train.jsonl:10": "input 'img/out.png': symbolic link out of --src (to "
        f"{outside.resolve() / 'x.png'})",
        "train.jsonl:11": f"{raw / 'img' / 'missing.png'}: no such file",
        "train.jsonl:12": "field 'kind' is 'hologram', expected one of text, image, audio, video",
        "train.jsonl:13": "empty input text",
        "train.jsonl:14": "empty answer",
        "train.jsonl:15": "field 'task' is not a non-empty string",
        "train.jsonl:18": "invalid UTF-8: invalid start byte at byte 0",
    }
    assert sorted(q) == sorted(expected), q
    for where, reason in expected.items():
        assert q[where].startswith(reason), (where, q[where])
    assert m.splits["train"].samples == 4 and m.splits["test"].samples == 1
    assert m.splits["train"].tasks == {"qa": 2, "sentiment": 1, "sound": 1}
    samples = {
        Path(meta.source).name: (meta, f) for meta, f in read_samples(tmp_path / "out").values()
    }
    renders = {
        "train.jsonl:1": ("sentiment", TEXT.render_text("the movie was great")),
        "train.jsonl:2": ("qa", render_image(raw / "img" / "red.png", SPEC)),
        "train.jsonl:3": ("sound", render_audio(raw / "snd" / "tone.wav", SPEC)),
        "train.jsonl:4": ("qa", TEXT.render_text("img/red.png")),
        "test.jsonl:1": ("qa", TEXT.render_text("how many")),
    }
    assert sorted(samples) == sorted(renders)
    for where, (task, inputs) in renders.items():
        meta, frames = samples[where]
        assert meta.task == task
        direct = build_clip(TEXT, task, inputs, TEXT.render_text(meta.answer))
        assert np.array_equal(frames, direct.frames), where
    assert samples["train.jsonl:2"][0].extra == {"file": "img/red.png"}
    verified(tmp_path / "out", capsys)


def test_jsonl_lines_that_json_cannot_parse_safely(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    good = json.dumps({"input": "a b", "answer": "c"})
    deep = "[" * 100_000 + "]" * 100_000
    (raw / "train.jsonl").write_text("\n".join([good, deep, '{"input": ' + "9" * 5000 + "}"]))
    m = build("jsonl", raw, tmp_path / "out")
    q = quarantine(m, raw)
    assert q["train.jsonl:2"].startswith("not a JSON object: RecursionError")
    assert q["train.jsonl:3"].startswith("not a JSON object: ValueError: Exceeds the limit")
    assert m.splits["train"].samples == 1


def test_jsonl_split_file_that_is_not_a_file_or_leads_out_is_one_quarantined_input(tmp_path):
    raw, outside = tmp_path / "raw", tmp_path / "outside"
    raw.mkdir()
    outside.mkdir()
    (raw / "train.jsonl").write_text(json.dumps({"input": "a b", "answer": "c"}) + "\n")
    (raw / "val.jsonl").mkdir()
    (outside / "x.jsonl").write_text(json.dumps({"input": "a b", "answer": "c"}) + "\n")
    (raw / "test.jsonl").symlink_to(outside / "x.jsonl")
    m = build("jsonl", raw, tmp_path / "out")
    assert quarantine(m, raw) == {
        "val.jsonl": "not a regular file (a directory)",
        "test.jsonl": f"symbolic link out of --src (to {outside.resolve() / 'x.jsonl'})",
    }
    assert m.splits["train"].samples == 1


# -- builders from outside the repository --------------------------------------------------------
PLUGIN = """
from dataclasses import dataclass

from preprocessing.builders import Builder, Example, Item


@dataclass
class Options:
    words: str = "hello world"


class Echo(Builder):
    name = "echo"
    Options = Options
    needs_src = False

    def list_items(self):
        return {"train": [Item(f"echo:{i}", i, i % 2) for i in range(6)]}

    def example(self, item):
        return Example("echo", self.words(self.options.words), self.words(str(item.data)),
                       str(item.data), item.data)


def not_a_class():
    pass


class NotABuilder:
    pass
"""


def run_cli(tmp_path: Path, *args: str, path: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path or tmp_path), str(REPO)])}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "evav.cli", "preprocess", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_builder_named_by_module_path(tmp_path, capsys):
    (tmp_path / "myplugin.py").write_text(PLUGIN)
    out = tmp_path / "out"
    r = run_cli(tmp_path, "myplugin:Echo", "--out", str(out), "words=hi", "--limit", "4")
    assert r.returncode == 0, r.stderr
    m = load_manifest(out)
    assert m.builder == "myplugin:Echo" and m.options == {"words": "hi"}
    assert m.splits["train"].samples == 4
    assert sorted(meta.label % 2 for meta, _ in read_samples(out).values()) == [0, 0, 1, 1]
    verified(out, capsys)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("nosuchmodule:Echo", "builder nosuchmodule:Echo: cannot import module 'nosuchmodule': "
         "ModuleNotFoundError: No module named 'nosuchmodule'"),
        ("myplugin:Missing", "builder myplugin:Missing: module 'myplugin' has no attribute "
         "'Missing'"),
        ("myplugin:not_a_class", "builder myplugin:not_a_class: got a function, not a subclass "
         "of preprocessing.builders.Builder"),
        ("myplugin:NotABuilder", "builder myplugin:NotABuilder: got class NotABuilder, not a "
         "subclass of preprocessing.builders.Builder"),
        ("broken:Echo", "builder broken:Echo: cannot import module 'broken': "
         "ZeroDivisionError: division by zero"),
        ("myplugin:", "builder myplugin:: expected MODULE:CLASS"),
        ("nosuch", "unknown builder 'nosuch'; available: audiofolder, audiomnist, cifar10"),
    ],
)  # fmt: skip
def test_a_builder_that_cannot_be_loaded_is_one_line(tmp_path, monkeypatch, capsys, name, reason):
    (tmp_path / "myplugin.py").write_text(PLUGIN)
    (tmp_path / "broken.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError) as e:
        get_builder(name)
    assert str(e.value).startswith(reason)
    err = fails(capsys, name, tmp_path, tmp_path / "out")
    assert err.startswith(f"evav preprocess: error: {reason}")


def test_entry_point_builders_are_listed_and_built(tmp_path, capsys):
    site = tmp_path / "site"
    (site / "evav_echo").mkdir(parents=True)
    (site / "evav_echo" / "__init__.py").write_text(PLUGIN)
    info = site / "evav_echo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: evav-echo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[evav.builders]\necho = evav_echo:Echo\nbad = evav_echo:not_a_class\n"
    )
    r = run_cli(tmp_path, "--list", path=site)
    assert r.returncode == 0, r.stderr
    listed = [line.split()[0] for line in r.stdout.splitlines()]
    assert "echo" in listed and "imagefolder" in listed and "jsonl" in listed
    bad = next(line for line in r.stdout.splitlines() if line.startswith("bad "))
    assert (
        "cannot be loaded: builder bad (entry point evav_echo:not_a_class): got a function" in bad
    )
    out = tmp_path / "out"
    r = run_cli(tmp_path, "echo", "--out", str(out), path=site)
    assert r.returncode == 0, r.stderr
    assert load_manifest(out).splits["train"].samples == 6
    verified(out, capsys)
    r = run_cli(tmp_path, "bad", "--out", str(tmp_path / "bad"), path=site)
    assert r.returncode == 2 and r.stderr.strip() == (
        "evav preprocess: error: builder bad (entry point evav_echo:not_a_class): got a "
        "function, not a subclass of preprocessing.builders.Builder"
    )


def test_generic_builders_are_registered():
    assert {"imagefolder", "audiofolder", "jsonl"} <= set(builder_names())
