"""The crop policy (evav.data.clips.crop_window): a clip longer than data.clip_frames never loses
its task frame or its answer; the input's middle is kept, or the clip is refused as too_long;
the loader counts what it cropped (data/cropped_frac) on real built shards."""

from __future__ import annotations

import numpy as np
import pytest

from evav.data import DataConfig, Loader
from evav.data.clips import BadSample, crop_window
from evav.manifest import SampleMeta


def meta(task=1, inp=10, sep=1, out=2, supervise="outputs") -> SampleMeta:
    seg = {"task": task, "input": inp, "separator": sep, "output": out}
    return SampleMeta(
        key="k",
        task="t",
        split="train",
        source="s",
        segments=seg,
        num_frames=sum(seg.values()),
        supervise=supervise,
        answer="a",
        label=None,
        render_hash="r",
        clip_sha256="0" * 64,
    )


def kept(pieces) -> list[int]:
    return [i for a, b in pieces for i in range(a, b)]


def test_a_clip_that_fits_is_kept_whole():
    assert crop_window(meta(), 14, 14, 0, "k") == [(0, 14)]
    assert crop_window(meta(), 14, 20, 0, "k") == [(0, 14)]


@pytest.mark.parametrize(
    ("task", "inp", "sep", "out", "clip"),
    [(1, 10, 1, 2, 8), (1, 11, 1, 2, 8), (2, 30, 0, 3, 6), (1, 5, 1, 1, 4), (1, 3, 1, 2, 5)],
)
def test_the_task_frames_and_the_answer_are_kept_and_the_middle_of_the_input(
    task, inp, sep, out, clip
):
    m = meta(task, inp, sep, out)
    t = m.num_frames
    idx = kept(crop_window(m, t, clip, 0, "k"))
    assert len(idx) == clip and idx == sorted(set(idx))
    assert idx[:task] == list(range(task))  # the task frame(s)
    assert idx[-(sep + out) :] == list(range(t - sep - out, t))  # separator and answer
    inp_kept = idx[task : clip - sep - out]
    n = clip - task - sep - out
    assert inp_kept == list(range(inp_kept[0], inp_kept[0] + n))  # one contiguous window
    before, after = inp_kept[0] - task, (task + inp) - (inp_kept[-1] + 1)
    assert abs(before - after) <= 1  # centred in the input


def test_no_room_for_the_input_or_refuse_is_too_long():
    with pytest.raises(BadSample, match=r"task frame\(s\) and answer alone are 4") as e:
        crop_window(meta(1, 10, 1, 2), 14, 4, 0, "k")
    assert e.value.kind == "too_long"
    with pytest.raises(BadSample, match="data.crop=refuse") as e:
        crop_window(meta(), 14, 8, 0, "k", "refuse")
    assert e.value.kind == "too_long"
    assert crop_window(meta(), 14, 14, 0, "k", "refuse") == [(0, 14)]


def test_pretraining_clips_keep_a_seeded_window():
    m = meta(1, 30, 0, 0, supervise="all")
    a = crop_window(m, 31, 8, 0, "key-a")
    assert len(a) == 1 and a[0][1] - a[0][0] == 8
    assert crop_window(m, 31, 8, 0, "key-a") == a  # exact on resume
    starts = {crop_window(m, 31, 8, s, "key-a")[0][0] for s in range(20)}
    assert len(starts) > 3  # the seed moves it


def test_loader_counts_cropped_samples_and_keeps_the_answer(tmp_path):
    from preprocessing.runner import BuildConfig, build

    out = tmp_path / "ds"
    # synthetic clips of the tasks 'add', 'count', ...: 6 to 10 frames at these settings
    build(
        BuildConfig(
            builder="synthetic",
            out=str(out),
            options={"train_per_task": 4, "val_per_task": 1},
            render={"height": 32, "width": 32},
            shard_samples=8,
        )
    )
    frames_of = {}
    for clip_frames in (64, 5):
        cfg = DataConfig(train=[str(out)], clip_frames=clip_frames, pad_to="longest")
        ld = Loader(cfg, split="val", batch_size=5, infinite=False)
        n = 0
        for b in ld:
            for i, key in enumerate(b["key"]):
                real = ~b["pad_mask"][i]
                frames_of.setdefault(key, {})[clip_frames] = (
                    int(real.sum()),
                    b["loss_mask"][i][real].numpy(),
                )
                n += 1
        stats = ld.stats()
        if clip_frames == 64:
            assert stats["data/cropped_frac"] == 0.0
        else:
            assert 0 < stats["data/cropped_frac"] <= 1.0
    cropped = 0
    for whole, short in (v.values() for v in frames_of.values()):
        if whole[0] > 5:
            cropped += 1
            assert short[0] == 5
            # the answer's frames are supervised at the end, as in the whole clip
            n_ans = int(whole[1].sum())
            assert n_ans >= 1 and short[1][-n_ans:].all() and not short[1][0]
    assert cropped > 0
    assert np.isclose(stats["data/cropped_frac"], cropped / len(frames_of))


def test_inspect_shows_what_each_clip_frames_would_crop_on_sst2_sentences(raw_sources, tmp_path):
    """SST-2 sentences (made ones, and the real ones when present) run to many frames: inspect's
    crop shares are those of the clips longer than each clip_frames."""
    from evav.cli import main
    from preprocessing.inspect import CLIP_FRAMES, inspect

    out = tmp_path / "sst2"
    assert (
        main(
            [
                "preprocess",
                "sst2",
                "--src",
                str(raw_sources["sst2"]),
                "--out",
                str(out),
                "--limit",
                "40",
            ]
        )
        == 0
    )
    report = inspect(out)
    total = sum(report.frames_hist.values())
    for c in CLIP_FRAMES:
        longer = sum(n for t, n in report.frames_hist.items() if t > c)
        assert report.crops[(c, "cropped")] + report.crops[(c, "too_long")] == longer
    assert report.crops[(8, "cropped")] > 0  # these sentences are longer than 8 frames
    assert f"clip_frames=8   {report.crops[(8, 'cropped')] / total:6.1%} cropped" in report.text()
