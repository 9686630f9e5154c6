"""Task readers on hand-made generated frames with known answers (no model involved).

Frames are rendered with the real TextRenderer / box drawer, then perturbed, so each test knows
exactly what the read-out must say.
"""

from __future__ import annotations

import numpy as np
import pytest

from evav.eval.readers import (
    ClassificationReader,
    MultiLabelReader,
    OpenAnswerReader,
    TrackingReader,
    VideoPredictionReader,
    kind_of,
    make_reader,
    prompt_length,
)
from evav.eval.samples import EvalSample
from evav.frames import RenderSpec, TextRenderer, draw_box

TEXT = TextRenderer(RenderSpec())


def sample(task, answer="", label=None, segments=None, extra=None, key="k"):
    seg = segments or {"task": 1, "input": 1, "separator": 1, "output": len(TEXT.tokenize(answer))}
    meta = {
        "key": key,
        "task": task,
        "answer": answer,
        "label": label,
        "segments": seg,
        "num_frames": sum(seg.values()),
        "extra": extra or {},
    }
    return EvalSample("d", "shard.tar", 0, meta)


def noisy(frames, seed=0, sigma=40.0):
    rng = np.random.default_rng(seed)
    return np.clip(frames.astype(np.float64) + rng.normal(0, sigma, frames.shape), 0, 255).astype(
        np.uint8
    )


def test_kinds_from_task_and_metadata():
    assert kind_of("fsdd", [sample("fsdd", "seven")]) == "classification"
    assert (
        kind_of(
            "next", [sample("next", segments={"task": 1, "input": 4, "separator": 1, "output": 2})]
        )
        == "video_prediction"
    )
    assert kind_of("clevrer", [sample("clevrer", "cube")]) == "open"
    assert kind_of("tinyvirat", [sample("tinyvirat", "walking")]) == "multilabel"
    assert kind_of("lasot", [sample("lasot")]) == "tracking"
    assert kind_of("colorize", [sample("colorize")]) == "colorization"


def test_classification_reads_noisy_and_multi_frame_answers():
    samples = [sample("sst2", a) for a in ("negative", "positive", "very good", "good")]
    r = ClassificationReader("sst2", samples, TEXT)
    assert r.labels == ["good", "negative", "positive", "very good"]
    assert r.gen_length(samples[0]) == 2  # the longest candidate
    for i, answer in enumerate(r.labels):
        frames = TEXT.render_text(answer)
        gen = np.concatenate([frames, np.zeros((2 - len(frames), 64, 64, 3), np.uint8)])
        assert r.nearest(noisy(gen, seed=i)) == answer
    # "very good" vs "good": the second frame decides, not just the first
    gen = np.concatenate([TEXT.render_text("very"), TEXT.render_text("good")])
    assert r.nearest(gen) == "very good"
    recs = [
        r.read(TEXT.render_text(a)[:1].repeat(2, 0), None, s)
        for a, s in zip(["negative", "negative", "positive", "good"], samples)
    ]
    m = r.score(recs)
    assert m["accuracy"] == pytest.approx(0.5)  # negative/positive right; positive, good wrong
    assert m["confusion"][r.labels.index("positive")][r.labels.index("negative")] == 1


def test_open_answers_use_the_vocabulary_word_by_word():
    samples = [sample("clevrer", a) for a in ("cube", "red", "rubber sphere")]
    r = OpenAnswerReader("clevrer", samples, TEXT)
    assert r.vocab == ["cube", "red", "rubber", "sphere"]
    gen = noisy(np.concatenate([TEXT.render_text("rubber cube")]), seed=3)
    rec = r.read(gen, None, samples[2])
    assert rec == {"pred": "rubber cube", "true": "rubber sphere"}
    assert r.score([rec, r.read(TEXT.render_text("cube red"), None, samples[0])])["accuracy"] == 0.5


def test_multilabel_maps_words_back_to_labels():
    samples = [
        sample("tinyvirat", "running walking", label=["running", "walking"]),
        sample("tinyvirat", "talking", label=["talking"]),
    ]
    r = MultiLabelReader("tinyvirat", samples, TEXT)
    assert r.labels == ["running", "talking", "walking"]
    rec = r.read(noisy(TEXT.render_text("walking talking"), seed=1), None, samples[0])
    assert rec["pred"] == ["talking", "walking"] and rec["true"] == ["running", "walking"]
    m = r.score([rec, r.read(TEXT.render_text("talking talking"), None, samples[1])])
    # running: tp0 fn1 -> 0; talking: tp1 fp1 -> 2/3; walking: tp1 -> 1
    assert m["f1_macro"] == pytest.approx((0 + 2 / 3 + 1) / 3)
    assert m["exact_match"] == 0.5


def test_tracking_iou_from_red_boxes():
    boxes = [[10, 10, 29, 29], [12, 10, 31, 29], [14, 10, 33, 29]]
    s = sample(
        "lasot",
        segments={"task": 1, "input": 1, "separator": 1, "output": 2},
        extra={"boxes": boxes},
    )
    r = TrackingReader("lasot", [s], TEXT)
    blank = np.zeros((64, 64, 3), np.uint8)
    gen = np.stack([draw_box(blank, tuple(boxes[1])), draw_box(blank, (24, 10, 43, 29))])
    rec = r.read(gen, gen, s)
    assert rec["iou_per_frame"][0] == pytest.approx(1.0)
    # (24..43) vs (14..33): overlap 10 of 20 columns -> 200 / (400 + 400 - 200)
    assert rec["iou_per_frame"][1] == pytest.approx(200 / 600)
    assert r.score([rec])["mean_iou"] == pytest.approx((1 + 1 / 3) / 2)


def test_video_prediction_per_frame_index():
    s = sample("next", segments={"task": 1, "input": 4, "separator": 1, "output": 2})
    r = make_reader("next", [s], TEXT)
    assert isinstance(r, VideoPredictionReader) and r.gen_length(s) == 2
    truth = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    gen = truth.copy()
    gen[1] = noisy(truth[1], sigma=20)
    rec = r.read(gen, truth, s)
    m = r.score([rec])
    assert m["psnr_per_frame"][0] == 100.0  # identical frame (inf) counted as 100 dB
    assert 20 < m["psnr_per_frame"][1] < 30 and m["ssim_per_frame"][0] == pytest.approx(1.0)


def test_pretraining_clip_is_split_in_half():
    s = sample("video", segments={"task": 1, "input": 20})
    assert prompt_length(s.meta) == 11
    r = make_reader("video", [s], TEXT, max_video_frames=8)
    assert r.truth_length(s) == 8


def test_an_answer_that_renders_to_no_frame_is_never_read_out():
    samples = [sample("sst2", a) for a in ("good", " ", "bad")]
    r = ClassificationReader("sst2", samples, TEXT)
    assert r.labels == [" ", "bad", "good"] and r.gen_length(samples[0]) == 1
    blank = np.zeros((1, 64, 64, 3), np.uint8)  # nearest to an empty template, were it allowed
    assert r.nearest(blank) in ("bad", "good")
    assert r.nearest(TEXT.render_text("good")) == "good"
    with pytest.raises(ValueError, match="no candidate answer renders to a frame"):
        ClassificationReader("sst2", [sample("sst2", " "), sample("sst2", "\t")], TEXT)


def test_classification_ranks_every_candidate_nearest_first():
    samples = [sample("sst2", a) for a in ("negative", "positive", "very good", "good")]
    r = ClassificationReader("sst2", samples, TEXT)
    gen = noisy(np.concatenate([TEXT.render_text("very"), TEXT.render_text("good")]), seed=5)
    ranked = r.ranked(gen)
    assert [label for label, _ in ranked][0] == "very good" and len(ranked) == 4
    dists = [d for _, d in ranked]
    assert dists == sorted(dists) and dists[0] < dists[1]
    # the distance is the mean squared pixel difference, per answer frame
    exact = r.ranked(np.concatenate([TEXT.render_text("very"), TEXT.render_text("good")]))
    assert exact[0] == ("very good", 0.0)
    # one generated frame of a two-frame answer: each candidate compared on that frame only
    assert r.ranked(TEXT.render_text("very"))[0] == ("very good", 0.0)


def test_video_prediction_copy_last_frame_baseline():
    s = sample("next", segments={"task": 1, "input": 3, "separator": 1, "output": 2})
    r = make_reader("next", [s], TEXT)
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)  # task, 3 inputs, separator
    truth = np.stack([prompt[3], noisy(prompt[3], sigma=20)])  # still, then a little change
    base = r.baseline(prompt, truth, s)
    assert base["copy_last_psnr_per_frame"][0] == 100.0  # the last input frame, not the separator
    assert 20 < base["copy_last_psnr_per_frame"][1] < 30
    rec = {**r.read(truth, truth, s), **base}
    m = r.score([rec])
    assert m["psnr"] == 100.0 and m["copy_last_psnr"] == pytest.approx(
        np.mean(base["copy_last_psnr_per_frame"])
    )
    assert 0 < m["copy_last_ssim"] < 1
    # a pretraining clip (no separator): the prompt's last frame is the last input frame
    p = sample("video", segments={"task": 1, "input": 6})
    clip = rng.integers(0, 256, (7, 64, 64, 3), dtype=np.uint8)
    n = prompt_length(p.meta)
    got = make_reader("video", [p], TEXT).baseline(clip[:n], clip[n - 1 : n], p)
    assert got["copy_last_psnr_per_frame"] == [100.0]


def test_generate_reads_open_and_multilabel_answers_back_as_words(tmp_path):
    """`evav generate`'s read-back (evav.eval.cli.read_back) for the kinds that are not
    classification: frames rendered from an answer's words read back as those words, against
    a real dataset built by the jsonl builder (task clevrer: open; tinyvirat: multi-label)."""
    import json
    from types import SimpleNamespace

    from evav.cli import main
    from evav.eval.cli import read_back
    from evav.manifest import load_manifest

    for task, answers, said in [
        ("clevrer", ["red cube", "blue sphere", "green cylinder"], "blue sphere"),
        ("tinyvirat", ["walking", "riding bike", "walking riding"], "riding bike"),
    ]:
        raw, out = tmp_path / task / "raw", tmp_path / task / "out"
        raw.mkdir(parents=True)
        lines = [json.dumps({"input": f"question {i}", "answer": a}) for i, a in enumerate(answers)]
        (raw / "val.jsonl").write_text("\n".join(lines) + "\n")
        assert (
            main(["preprocess", "jsonl", "--src", str(raw), "--out", str(out), f"task={task}"]) == 0
        )
        spec = RenderSpec(**load_manifest(out).render_spec)
        gen = TextRenderer(spec).render_tokens(TextRenderer(spec).tokenize(said))
        line = read_back(SimpleNamespace(), spec, task, gen, str(out))
        assert line.startswith(f"read back: {said!r} (each frame as the nearest of"), line
        if task == "tinyvirat":  # its labels: the answers' words
            assert line.endswith("answer words; labels ['bike', 'riding'])"), line
