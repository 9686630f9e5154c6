"""Renderers on real data (../shared/datasets) and on bad files; read-back of a whole vocabulary."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch

from evav.errors import BadInputError
from evav.frames import (
    RenderSpec,
    TemplateDecoder,
    TextRenderer,
    render_audio,
    render_image,
    render_video,
    split_words,
)


def sst2_vocabulary(datasets) -> list[str]:
    words = set()
    with open(datasets / "sst2" / "train.tsv", encoding="utf-8") as f:
        next(f)
        for line in f:
            words.update(split_words(line.rsplit("\t", 1)[0]))
    return sorted(words)


def test_every_sst2_training_word_reads_back_as_itself(datasets):
    """Render the whole SST-2 training vocabulary at 64x64 and decode each frame against all.

    A word longer than max_token_chars becomes several frames; each piece is a vocabulary entry.
    Collisions (identical or near-identical renders, RMS < 1 grey level) are counted: there must
    be none, and the closest distinct pair is reported.
    """
    text = TextRenderer(RenderSpec(), cache_size=10**6)
    vocab = sorted({piece for w in sst2_vocabulary(datasets) for piece in text.tokenize(w)})
    assert len(vocab) > 13000
    decoder = TemplateDecoder.for_words(text, vocab)
    n_pix = 64 * 64 * 3
    wrong, nearest_other = [], []
    for s in range(0, len(vocab), 2048):
        frames = np.stack([text.render_token(w) for w in vocab[s : s + 2048]])
        d = decoder.distances(frames)
        top2 = d.topk(2, largest=False)
        for i, (idx, dist) in enumerate(zip(top2.indices.tolist(), top2.values.tolist())):
            if vocab[idx[0]] != vocab[s + i]:
                wrong.append((vocab[s + i], vocab[idx[0]]))
            nearest_other.append((float(np.sqrt(dist[1] / n_pix)), vocab[s + i], vocab[idx[1]]))
    collisions = [x for x in nearest_other if x[0] < 1.0]
    closest = min(nearest_other)
    print(
        f"\nSST-2 vocabulary: {len(vocab)} tokens; wrong read-backs: {len(wrong)}; "
        f"collisions (RMS < 1): {len(collisions)}; closest distinct pair: {closest}"
    )
    assert not wrong, f"{len(wrong)} words read back as another word, e.g. {wrong[:10]}"
    assert not collisions, f"near-identical renders: {collisions[:10]}"


def test_every_fsdd_recording_renders(datasets):
    spec = RenderSpec()
    files = sorted((datasets / "fsdd" / "recordings").glob("*.wav"))
    assert len(files) == 2500
    means = []
    for path in files:
        frames = render_audio(path, spec)
        assert frames.shape == (1, 64, 64, 3)
        means.append(frames.mean())
    assert min(means) > 5, "a spectrogram came out (almost) black"


def test_audiomnist_48k_recordings_render(datasets):
    files = sorted((datasets / "audiomnist_samples").rglob("*.wav"))
    assert files
    for path in files:
        assert render_audio(path, RenderSpec()).shape == (1, 64, 64, 3)


def test_cifar10_sample_renders(datasets):
    files = sorted((datasets / "cifar10" / "test").glob("*/*.jpg"))
    random.Random(0).shuffle(files)
    for path in files[:300]:
        frame = render_image(path, RenderSpec())
        assert frame.shape == (1, 64, 64, 3) and frame.std() > 0


@pytest.mark.parametrize("budget", [4, 16, 200])
def test_every_real_video_renders(datasets, budget):
    for path in sorted((datasets / "videos").glob("*.mp4")):
        frames = render_video(path, RenderSpec(), budget)
        assert frames.ndim == 4 and frames.shape[1:] == (64, 64, 3)
        assert 1 <= len(frames) <= budget and (budget > 20 or len(frames) == budget)


# ---- bad inputs: every kind gets a clear error that names the file and the reason -----------


def _cut(src, dst, fraction):
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


@pytest.fixture
def bad_files(datasets, tmp_path):
    wav = datasets / "fsdd" / "recordings" / "3_jackson_7.wav"
    jpg = next((datasets / "cifar10" / "test" / "cat").glob("*.jpg"))
    mp4 = datasets / "videos" / "brink_20_256.mp4"
    garbage = bytes(random.Random(1).getrandbits(8) for _ in range(4096))
    files = {}
    for kind, src in (("audio", wav), ("image", jpg), ("video", mp4)):
        suffix = src.suffix
        empty = tmp_path / f"empty_{kind}{suffix}"
        empty.write_bytes(b"")
        junk = tmp_path / f"garbage_{kind}{suffix}"
        junk.write_bytes(garbage)
        files[kind] = {
            "empty": (empty, "empty file"),
            "unreadable": (junk, "not a"),
            "truncated": (
                _cut(src, tmp_path / f"cut_{kind}{suffix}", 0.6),
                "truncated|not a readable",
            ),
            "missing": (tmp_path / f"missing{suffix}", "no such file"),
        }
    return files


RENDER = {
    "audio": lambda p: render_audio(p, RenderSpec()),
    "image": lambda p: render_image(p, RenderSpec()),
    "video": lambda p: render_video(p, RenderSpec(), 8),
}


@pytest.mark.parametrize("kind", ["audio", "image", "video"])
@pytest.mark.parametrize("problem", ["empty", "unreadable", "truncated", "missing"])
def test_bad_file_error_names_file_and_reason(bad_files, kind, problem):
    path, reason = bad_files[kind][problem]
    with pytest.raises(BadInputError, match=reason) as err:
        RENDER[kind](path)
    assert err.value.path == str(path) and str(path) in str(err.value)


def test_truncated_faststart_mp4_is_caught_by_frame_count(datasets, tmp_path):
    """With the index at the front, a cut mp4 opens and decodes a few frames without error."""
    import av

    src = tmp_path / "fast.mp4"
    frames = render_video(
        datasets / "videos" / "brink_20_256.mp4", RenderSpec(height=128, width=128), 64
    )
    with av.open(str(src), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=10)
        s.width = s.height = 128
        s.pix_fmt = "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode(None))
    cut = _cut(src, tmp_path / "fast_cut.mp4", 0.5)
    with pytest.raises(BadInputError, match="truncated"):
        render_video(cut, RenderSpec(), 8)


# ---- the read-back decoder on its own -------------------------------------------------------


def test_template_decoder_matches_brute_force_l2_in_colour_and_grey():
    rng = np.random.default_rng(0)
    for grey in (True, False):
        t = rng.integers(0, 256, (20, 8, 8, 1 if grey else 3), dtype=np.uint8)
        t = np.repeat(t, 3, -1) if grey else t
        q = rng.integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
        dec = TemplateDecoder(t, [str(i) for i in range(20)])
        assert dec.grey == grey
        brute = (
            ((q[:, None].astype(np.float64) - t[None].astype(np.float64)) ** 2)
            .reshape(7, 20, -1)
            .sum(-1)
        )
        assert torch.allclose(dec.distances(q).double(), torch.from_numpy(brute), rtol=1e-5, atol=1)
        assert dec.decode(q) == [str(i) for i in brute.argmin(1)]


def test_template_decoder_reads_noisy_renders():
    text = TextRenderer(RenderSpec())
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    dec = TemplateDecoder.for_words(text, words)
    rng = np.random.default_rng(0)
    clean = np.stack([text.render_token(w) for w in words]).astype(np.float32)
    noisy = np.clip(clean + rng.normal(0, 60, clean.shape), 0, 255).astype(np.uint8)
    assert dec.decode(noisy) == words
    assert dec.collisions() == []
    dup = TemplateDecoder.for_words(text, ["same", "same", "other"])
    assert [(a, b) for a, b, _ in dup.collisions()] == [("same", "same")]


# ---- SentencePiece --------------------------------------------------------------------------


def test_sentencepiece_tokenizer_train_and_render(datasets, tmp_path):
    from evav.cli import main

    corpus = tmp_path / "corpus.txt"
    lines = (datasets / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:3001]
    corpus.write_text("\n".join(line.rsplit("\t", 1)[0] for line in lines))
    model = tmp_path / "tok.model"
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--input",
                str(corpus),
                "--out",
                str(model),
                "--vocab-size",
                "500",
            ]
        )
        == 0
    )
    spec = RenderSpec(tokenizer=str(model))
    text = TextRenderer(spec)
    pieces = text.tokenize("unforgettable performances")
    assert 2 <= len(pieces) and "".join(pieces) == "unforgettableperformances"
    assert text.render_text("unforgettable performances").shape == (len(pieces), 64, 64, 3)
    assert spec.hash != RenderSpec().hash
    moved = tmp_path / "moved.model"
    shutil.copy(model, moved)
    assert RenderSpec(tokenizer=str(moved)).hash == spec.hash
