"""`evav preprocess` on real data: counts, frame shapes, metadata, decoded clips vs direct renders.

Slices of ../shared/datasets (or $EVAV_DATASETS; skipped when absent) are built through the real
CLI entry point in-process. Builders of datasets that are not available here (CIFAR pickle
batches, CLEVRER videos, TinyVIRAT, LaSOT) are built from small fixtures written in the official
layout from the real files.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from evav.cli import main
from evav.codec import decode_clip
from evav.frames import (
    RenderSpec,
    TemplateDecoder,
    TextRenderer,
    build_clip,
    find_red_box,
    render_audio,
    render_image,
    render_video,
)
from evav.manifest import Manifest, SampleMeta, load_manifest
from preprocessing.builders import builder_names
from preprocessing.builders.clevrer import parse_questions
from preprocessing.shards import iter_members

SPEC = RenderSpec()
TEXT = TextRenderer(SPEC)
LIMIT = 40


def preprocess(builder: str, src, out: Path, *extra: str) -> Manifest:
    args = ["preprocess", builder, "--out", str(out), *extra]
    if src is not None:
        args += ["--src", str(src)]
    assert main(args) == 0
    return load_manifest(out)


def read_samples(out: Path) -> dict[str, tuple[SampleMeta, np.ndarray]]:
    """``split/key`` -> (metadata, decoded frames) for every sample in the manifest's shards."""
    m = load_manifest(out)
    samples = {}
    for split in m.splits.values():
        for sh in split.shards:
            members: dict[str, dict[str, bytes]] = {}
            for key, ext, data in iter_members(out / sh.path, ("json", "mp4")):
                members.setdefault(key, {})[ext] = data
            assert len(members) == sh.samples
            for key, mem in members.items():
                meta = SampleMeta.from_dict(json.loads(mem["json"]))
                samples[f"{meta.split}/{key}"] = (meta, decode_clip(mem["mp4"]))
    return samples


def check_build(out: Path, m: Manifest) -> dict[str, tuple[SampleMeta, np.ndarray]]:
    """Invariants every build keeps: counts add up, frames have the metadata's shape and mask."""
    samples = read_samples(out)
    assert len(samples) == m.num_samples
    for name, s in m.splits.items():
        assert s.inputs == s.samples + sum(q.split == name for q in m.quarantined)
        assert s.frames == sum(sh.frames for sh in s.shards)
        assert sum(s.tasks.values()) == s.samples
    for meta, frames in samples.values():
        assert frames.shape == (meta.num_frames, SPEC.height, SPEC.width, 3)
        assert sum(meta.segments.values()) == meta.num_frames
        assert meta.render_hash == m.render_hash == SPEC.hash
        assert meta.supervise in ("outputs", "all")
        assert meta.segments["task"] == 1
    return samples


def assert_close(decoded: np.ndarray, direct: np.ndarray, codec: str) -> None:
    assert decoded.shape == direct.shape
    tol = 0 if codec.startswith("ffv1") else 3  # ffv1 is exact; H.264 4:4:4 qp 0 within 2-3 levels
    assert np.abs(decoded.astype(int) - direct).max() <= tol


def assert_text_frames_read_back(samples, tokens_of) -> None:
    """Every text frame (task, words, separator, answer) decodes to its token."""
    frames, words = [], []
    for meta, clip in samples.values():
        toks = tokens_of(meta)
        frames.append(clip[[i for i, t in enumerate(toks) if t is not None]])
        words += [t for t in toks if t is not None]
    decoder = TemplateDecoder.for_words(TEXT, sorted(set(words)))
    assert decoder.decode(np.concatenate(frames)) == words


def test_every_issue_builder_is_registered():
    assert set(builder_names()) == {
        "sst2",
        "cifar10",
        "audiomnist",
        "fsdd",
        "clevrer",
        "tinyvirat",
        "lasot",
        "moving_mnist",
        "text",
        "video",
        "synthetic",
        "imagefolder",
        "audiofolder",
        "jsonl",
    }


def test_fsdd(datasets, tmp_path):
    m = preprocess("fsdd", datasets / "fsdd", tmp_path, "--limit", str(LIMIT))
    assert m.splits["train"].samples == m.splits["test"].samples == LIMIT
    assert m.codec == "ffv1:bgr0" and not m.quarantined
    samples = check_build(tmp_path, m)
    for meta, _ in samples.values():
        take = int(Path(meta.source).stem.split("_")[2])
        assert (meta.split == "test") == (take < 5)  # the official split
        assert meta.segments == {"task": 1, "input": 1, "separator": 1, "output": 1}
        assert (
            meta.answer
            == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][
                meta.label
            ]
        )
    meta, frames = samples["test/00000003"]
    direct = build_clip(
        TEXT, "fsdd", render_audio(meta.source, SPEC), TEXT.render_text(meta.answer)
    )
    assert_close(frames, direct.frames, m.codec)
    assert_text_frames_read_back(samples, lambda mt: ["fsdd", None, "|", mt.answer])


def test_sst2_slice(datasets, tmp_path):
    m = preprocess(
        "sst2", datasets / "sst2", tmp_path, "--limit", str(LIMIT), "--shard-samples", "15"
    )
    assert set(m.splits) == {"train", "val"} and m.splits["val"].samples == LIMIT
    assert [sh.samples for sh in m.splits["val"].shards] == [15, 15, 10]
    samples = check_build(tmp_path, m)
    rows = (datasets / "sst2" / "dev.tsv").read_text().splitlines()
    meta, frames = samples["val/00000007"]  # the 8th row --limit kept (stratified, seeded)
    line = int(meta.source.rpartition(":")[2])
    sentence, label = rows[line - 1].split("\t")
    assert meta.source.endswith(f"dev.tsv:{line}") and meta.label == int(label)
    direct = build_clip(TEXT, "sst2", TEXT.render_text(sentence), TEXT.render_text(meta.answer))
    assert_close(frames, direct.frames, m.codec)
    assert_text_frames_read_back(
        samples, lambda mt: ["sst2", *TEXT.tokenize(mt.extra["text"]), "|", mt.answer]
    )


def test_cifar10_image_folder(datasets, tmp_path):
    m = preprocess("cifar10", datasets / "cifar10", tmp_path, "--limit", "30")
    samples = check_build(tmp_path, m)
    # ../shared holds test/ and (since issue 14) the whole train/ set: every split folder found
    # is a split, each cut to --limit
    splits = {p.name for p in (datasets / "cifar10").iterdir() if p.is_dir()}
    assert set(m.splits) == splits and "test" in splits
    assert all(s.samples == 30 for s in m.splits.values())
    for meta, frames in samples.values():
        assert Path(meta.source).parent.name == meta.answer
        assert_close(frames[1:2], render_image(meta.source, SPEC), m.codec)


def test_cifar10_pickle_batches(datasets, tmp_path):
    """A tiny batch in the official cifar-10-batches-py layout, made from the JPEG subset."""
    classes = sorted(p.name for p in (datasets / "cifar10" / "test").iterdir())
    jpgs = [sorted((datasets / "cifar10" / "test" / c).glob("*.jpg"))[0] for c in classes]
    images = [np.asarray(Image.open(j).convert("RGB")) for j in jpgs]
    order = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    labels = [order.index(c) for c in classes] + [12]  # the last one is mislabelled
    data = np.stack([im.transpose(2, 0, 1).reshape(-1) for im in images + images[:1]])
    raw = tmp_path / "raw" / "cifar-10-batches-py"
    raw.mkdir(parents=True)
    with open(raw / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": labels}, f)
    m = preprocess("cifar10", tmp_path / "raw", tmp_path / "out")
    assert m.splits["test"].samples == 10
    assert [(q.source, q.reason) for q in m.quarantined] == [
        (f"{raw / 'test_batch'}:10", "label 12 is not a class index 0-9")
    ]
    samples = check_build(tmp_path / "out", m)
    meta, frames = samples["test/00000004"]
    assert meta.answer == classes[4]
    assert_close(frames[1:2], render_image(images[4], SPEC), m.codec)


def test_audiomnist_sample_uses_its_speaker_disjoint_split_files(datasets, tmp_path):
    m = preprocess("audiomnist", datasets / "audiomnist_samples", tmp_path)
    samples = check_build(tmp_path, m)
    assert {k: s.samples for k, s in m.splits.items()} == {"train": 2, "val": 2, "test": 2}
    speakers = {
        split: {mt.extra["speaker"] for mt, _ in samples.values() if mt.split == split}
        for split in m.splits
    }
    assert not (speakers["train"] & speakers["val"]) and not (speakers["train"] & speakers["test"])
    meta, frames = next(v for v in samples.values() if v[0].source.endswith("6_56_49.wav"))
    assert meta.answer == "six"
    direct = build_clip(
        TEXT, "audiomnist", render_audio(meta.source, SPEC), TEXT.render_text("six")
    )
    assert_close(frames, direct.frames, m.codec)


def test_audiomnist_without_split_files_splits_by_speaker(datasets, tmp_path):
    shutil.copytree(datasets / "audiomnist_samples" / "data", tmp_path / "raw" / "data")
    m = preprocess(
        "audiomnist",
        tmp_path / "raw",
        tmp_path / "out",
        "valid_speakers=[42]",
        "test_speakers=[1,2]",
    )
    assert {k: s.samples for k, s in m.splits.items()} == {"train": 3, "val": 1, "test": 2}


def test_moving_mnist_from_the_idx_files(datasets, tmp_path):
    m = preprocess(
        "moving_mnist", datasets / "mnist", tmp_path, "test_sequences=6", "train_sequences=5"
    )
    assert set(m.splits) == {"test"}  # only t10k is here
    samples = check_build(tmp_path, m)
    meta, frames = samples["test/00000002"]
    assert meta.segments == {"task": 1, "input": 4, "separator": 1, "output": 4}
    assert meta.supervise == "outputs"
    video = frames[[1, 2, 3, 4, 6, 7, 8, 9]]
    assert video.max() > 200 and (video == 0).mean() > 0.5  # bright digits on black
    assert not np.array_equal(video[0], video[-1])  # they move
    from preprocessing.builders.moving_mnist import MovingMnistBuilder, MovingMnistOptions
    from preprocessing.runner import render_sample

    b = MovingMnistBuilder(datasets / "mnist", MovingMnistOptions(test_sequences=6), SPEC)
    members, _ = render_sample(b, b.list_items()["test"][2], "00000002", "test", "ffv1")
    np.testing.assert_array_equal(decode_clip(members["mp4"]), frames)


def test_video_folder_pretraining_clips(datasets, tmp_path):
    m = preprocess("video", datasets / "videos", tmp_path, "num_frames=6")
    samples = check_build(tmp_path, m)
    assert m.splits["train"].samples == 6 and m.codec == "libx264:yuv444p:qp=0"
    meta, frames = next(v for v in samples.values() if v[0].source.endswith("brink_20_256.mp4"))
    assert meta.supervise == "all" and meta.segments == {"task": 1, "input": 6}
    direct = build_clip(TEXT, "video", render_video(meta.source, SPEC, 6), supervise="all")
    assert_close(frames, direct.frames, m.codec)


def test_text_corpus_jsonl_and_txt(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "train.txt").write_text(
        "the cat sat on the mat .\n\na dog ran far away from the cat today\n"
    )
    (raw / "val.jsonl").write_text('{"text": "hello world"}\nnot json\n{"other": 1}\n')
    m = preprocess("text", raw, tmp_path / "out", "clip_tokens=5")
    samples = check_build(tmp_path / "out", m)
    assert m.splits["train"].samples == 4  # 7 tokens -> 5 + 2; 9 tokens -> 5 + 4
    assert m.splits["val"].samples == 1 and len(m.quarantined) == 2
    assert [q.source for q in m.quarantined] == [f"{raw / 'val.jsonl'}:2", f"{raw / 'val.jsonl'}:3"]
    meta, frames = samples["train/00000001"]
    assert meta.extra["text"] == "mat ."
    assert meta.supervise == "all"
    assert_close(frames[1:], TEXT.render_text(meta.extra["text"]), m.codec)


def test_synthetic_suite_is_deterministic_and_covers_every_task(tmp_path):
    args = ("train_per_task=6", "val_per_task=2", "--shard-samples", "8")
    m = preprocess("synthetic", None, tmp_path / "a", *args)
    samples = check_build(tmp_path / "a", m)
    assert m.splits["train"].tasks == {t: 6 for t in ("add", "count", "direction", "next", "pitch")}
    assert max(meta.num_frames for meta, _ in samples.values()) <= 8
    answers = {meta.task: set() for meta, _ in samples.values()}
    for meta, _ in samples.values():
        answers[meta.task].add(meta.answer)
        if meta.task == "add":
            a, _, b = meta.extra["question"].split()
            words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight"]
            assert words.index(a) + words.index(b) == meta.label
        if meta.task == "next":
            assert meta.segments["output"] == 2 and meta.answer == ""
    assert answers["direction"] <= {"left", "right", "up", "down"}
    assert answers["pitch"] <= {"low", "mid", "high", "top"}
    assert answers["count"] <= {"one", "two", "three", "four"}
    from preprocessing.builders.synthetic import SyntheticBuilder, SyntheticOptions

    b = SyntheticBuilder(None, SyntheticOptions(train_per_task=6, val_per_task=2), SPEC)
    for n, item in enumerate(b.list_items()["val"]):  # decoded == rendered directly, per task
        ex = b.example(item)
        direct = build_clip(TEXT, ex.task, ex.inputs, ex.outputs)
        assert_close(samples[f"val/{n:08d}"][1], direct.frames, m.codec)
    m2 = preprocess("synthetic", None, tmp_path / "b", *args)
    assert [sh.sha256 for s in m2.splits.values() for sh in s.shards] == [
        sh.sha256 for s in m.splits.values() for sh in s.shards
    ]
    m3 = preprocess("synthetic", None, tmp_path / "c", *args, "--seed", "1")
    assert m3.splits["train"].shards[0].sha256 != m.splits["train"].shards[0].sha256


def stand_in_video(src: Path, dst: Path, frames: int = 12) -> None:
    """A real clip, re-encoded at 64x64 under another name (the official layout's file name)."""
    from evav.frames import save_clip

    dst.parent.mkdir(parents=True, exist_ok=True)
    save_clip(render_video(src, SPEC, frames), dst, fps=8)


def test_clevrer_question_parsing_with_stand_in_videos(datasets, tmp_path):
    qfile = datasets / "clevrer_questions" / "valid-orig-small.json"
    scenes = parse_questions(qfile)
    assert len(scenes) == 564 and all(len(s["questions"]) == 1 for s in scenes)
    assert scenes[0]["scene_index"] == 4760 and scenes[0]["video_filename"] == "video_04760.mp4"
    raw = tmp_path / "raw"
    (raw / "questions").mkdir(parents=True)
    data = json.loads(qfile.read_text())
    keep = dict(list(data.items())[:2])
    keep[next(iter(keep))]["questions"].append(  # one open-ended (descriptive) question too
        {
            "question_id": 99,
            "question_type": "descriptive",
            "question": "what color is the cube ?",
            "answer": "green",
        }
    )
    (raw / "questions" / "validation.json").write_text(json.dumps(keep))
    videos = sorted((datasets / "videos").glob("brink*.mp4"))
    for n, idx in enumerate(keep):
        lo = int(idx) // 1000 * 1000
        stand_in_video(
            videos[n],
            raw
            / "video_validation"
            / f"video_{lo:05d}-{lo + 1000:05d}"
            / f"video_{int(idx):05d}.mp4",
        )
    m = preprocess("clevrer", raw, tmp_path / "open", "num_frames=4")
    assert m.splits["val"].samples == 1  # descriptive only by default
    n_choices = sum(
        len(q["choices"]) for s in keep.values() for q in s["questions"] if "choices" in q
    )
    m = preprocess("clevrer", raw, tmp_path / "mc", "num_frames=4", "multiple_choice=true")
    assert m.splits["val"].samples == 1 + n_choices and not m.quarantined
    samples = check_build(tmp_path / "mc", m)
    for meta, _ in samples.values():
        assert meta.answer in ("correct", "wrong", "green")
    meta, frames = samples["val/00000000"]
    q = keep["4760"]["questions"][0]
    assert (
        meta.extra["choice"] == q["choices"][0]["choice"]
        and meta.answer == q["choices"][0]["answer"]
    )
    video = render_video(next((raw / "video_validation").rglob("video_04760.mp4")), SPEC, 4)
    inputs = np.concatenate(
        [video, TEXT.render_text(q["question"]), TEXT.render_text(meta.extra["choice"])]
    )
    assert_close(
        frames, build_clip(TEXT, "clevrer", inputs, TEXT.render_text(meta.answer)).frames, m.codec
    )


def test_tinyvirat_action_and_colorize_from_official_layout(datasets, tmp_path):
    raw = tmp_path / "raw"
    videos = sorted((datasets / "videos").glob("*_320x180.mp4"))
    tubes = []
    for n, v in enumerate(videos):
        stand_in_video(v, raw / "videos" / "train" / f"VIRAT_S_0000{n}" / f"{n}.mp4")
        tubes.append(
            {
                "path": f"VIRAT_S_0000{n}/{n}.mp4",
                "label": ["activity_walking", "Talking"][: n + 1],
                "dim": [12, 64, 64],
            }
        )
    tubes.append({"path": "VIRAT_S_00009/9.mp4", "label": [], "dim": [0, 0, 0]})  # mislabelled
    (raw / "tiny_train.json").write_text(json.dumps({"tubes": tubes}))
    m = preprocess("tinyvirat", raw, tmp_path / "act", "num_frames=4")
    samples = check_build(tmp_path / "act", m)
    assert m.splits["train"].samples == len(videos) and len(m.quarantined) == 1
    assert "not a non-empty list" in m.quarantined[0].reason
    assert {meta.answer for meta, _ in samples.values()} == {
        "activity_walking",
        "activity_walking talking",
    }
    m = preprocess("tinyvirat", raw, tmp_path / "col", "num_frames=4", "task=colorize")
    meta, frames = check_build(tmp_path / "col", m)["train/00000000"]
    assert meta.segments == {"task": 1, "input": 4, "separator": 1, "output": 4}
    grey, colour = frames[1:5].astype(int), frames[6:].astype(int)
    assert (
        np.abs(grey[..., 0] - grey[..., 2]).max() <= 3
        and np.abs(colour[..., 0] - colour[..., 2]).max() > 20
    )


def test_lasot_first_frame_box_then_boxed_frames(datasets, tmp_path):
    seq = tmp_path / "raw" / "cat" / "cat-1"
    (seq / "img").mkdir(parents=True)
    frames = render_video(
        datasets / "videos" / "brink_20_256.mp4", RenderSpec(height=128, width=128), 20
    )
    lines = []
    for i, f in enumerate(frames):
        Image.fromarray(f).save(seq / "img" / f"{i + 1:08d}.jpg", quality=95)
        lines.append(f"{20 + i},{30 + i},40,32")
    lines[6] = "0,0,0,0"  # full occlusion: no box on that frame
    (seq / "groundtruth.txt").write_text("\n".join(lines) + "\n")
    m = preprocess("lasot", tmp_path / "raw", tmp_path / "out", "num_frames=4", "stride=2")
    samples = check_build(tmp_path / "out", m)
    assert m.splits["train"].samples == 2  # windows of 7 source frames in 20
    meta, clip = samples["train/00000000"]
    assert meta.segments == {"task": 1, "input": 1, "separator": 1, "output": 3}
    for k, i in enumerate([1, 3, 4, 5]):  # clip frame of source frames 0, 2, 4, 6
        found = find_red_box(clip[i])
        if k == 3:
            assert found is None and meta.extra["boxes"][3] is None
        else:
            want = [(20 + 2 * k) / 2, (30 + 2 * k) / 2, (60 + 2 * k) / 2 - 1, (62 + 2 * k) / 2 - 1]
            assert found is not None and np.abs(np.array(found) - np.round(want)).max() <= 1


def test_inspect_counts_and_writes_contact_sheet_and_gif(tmp_path, capsys):
    preprocess("synthetic", None, tmp_path / "d", "train_per_task=2", "val_per_task=1")
    capsys.readouterr()
    assert (
        main(["inspect", str(tmp_path / "d"), "--out", str(tmp_path / "s.png"), "--num", "4"]) == 0
    )
    out = capsys.readouterr().out
    assert "codec ffv1:bgr0" in out and "train    count" in out and "frames per clip" in out
    sheet = np.asarray(Image.open(tmp_path / "s.png"))
    assert sheet.shape[0] > 4 * 64 and sheet.shape[1] >= 4 * 64
    assert (
        main(
            [
                "inspect",
                str(tmp_path / "d" / "val" / "shard-000000.tar"),
                "--out",
                str(tmp_path / "c.gif"),
            ]
        )
        == 0
    )
    assert (tmp_path / "c.gif").stat().st_size > 0
    assert main(["inspect", str(tmp_path / "nothing")]) == 2


def test_shards_read_with_webdataset(tmp_path):
    import webdataset as wds

    m = preprocess("synthetic", None, tmp_path, "train_per_task=2", "val_per_task=1", "tasks=[add]")
    urls = [str(tmp_path / sh.path) for sh in m.splits["train"].shards]
    got = [
        (s["__key__"], json.loads(s["json"])["answer"])
        for s in wds.WebDataset(urls, shardshuffle=False)
    ]
    assert [k for k, _ in got] == ["00000000", "00000001"]
    assert all(isinstance(a, str) and a for _, a in got)
