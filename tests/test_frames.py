"""Renderers: goldens for every modality, shapes at 64/128/256, caching, hashing, boxes, clips."""

from __future__ import annotations

import wave

import numpy as np
import pytest
from PIL import Image, ImageDraw

from evav.frames import (
    AudioSpec,
    RenderSpec,
    TextRenderer,
    build_clip,
    draw_box,
    find_red_box,
    render_audio,
    render_image,
    render_video,
    split_words,
    uniform_indices,
)
from tests.conftest import TEST_DATA, assert_matches_golden


def test_image(width=40, height=30) -> Image.Image:
    """A fixed non-square test image: gradient, a disc and a bar."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    arr = np.concatenate(
        [x.repeat(height, 0), y.repeat(width, 1), np.full((height, width, 1), 90.0)], 2
    )
    img = Image.fromarray(arr.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.ellipse((5, 5, 20, 20), fill=(255, 255, 255))
    draw.rectangle((25, 18, 36, 26), fill=(0, 0, 0))
    return img


test_image.__test__ = False  # a fixture-maker, not a test


def write_tone_wav(path, sample_rate=8000, seconds=0.5):
    """A rising chirp (300 -> 3000 Hz) as 16-bit PCM."""
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    freq = 300 + 2700 * t / seconds
    x = 0.6 * np.sin(2 * np.pi * np.cumsum(freq) / sample_rate)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    return path


# ---- goldens -------------------------------------------------------------------------------


def test_text_golden():
    text = TextRenderer(RenderSpec())
    frames = text.render_text("The cat, 42 times!")
    assert [t for t in text.tokenize("The cat, 42 times!")] == [
        "The",
        "cat",
        ",",
        "42",
        "times",
        "!",
    ]
    assert frames.shape == (6, 64, 64, 3) and frames.dtype == np.uint8
    assert_matches_golden("text_64", frames)


def test_special_frames_golden():
    text = TextRenderer(RenderSpec())
    frames = np.stack([text.task_frame("sst2"), text.separator(), text.task_frame("moving_mnist")])
    assert_matches_golden("special_64", frames)


@pytest.mark.parametrize("fit", ["stretch", "letterbox", "crop"])
def test_image_golden(fit):
    frames = render_image(test_image(), RenderSpec(fit=fit))
    assert frames.shape == (1, 64, 64, 3)
    assert_matches_golden(f"image_{fit}", frames)


def test_audio_golden(tmp_path):
    wav = write_tone_wav(tmp_path / "chirp.wav")
    whole = render_audio(wav, RenderSpec())
    windows = render_audio(wav, RenderSpec(audio=AudioSpec(window_s=0.125)))
    assert whole.shape == (1, 64, 64, 3)
    assert windows.shape == (4, 64, 64, 3)  # 0.5 s in 0.125 s windows
    assert_matches_golden("audio_whole", whole)
    assert_matches_golden("audio_windows", windows)


def test_video_golden():
    frames = render_video(TEST_DATA / "moving_square.mp4", RenderSpec(), num_frames=6)
    assert frames.shape == (6, 64, 64, 3)
    assert_matches_golden("video_6", frames)


def test_boxes_golden_and_read_back():
    frames = np.zeros((2, 64, 64, 3), np.uint8)
    boxed = draw_box(frames, (10, 12, 40, 50), thickness=2)
    assert frames.max() == 0, "draw_box must not modify its input"
    assert_matches_golden("boxes", boxed)
    assert find_red_box(boxed[0]) == (10, 12, 40, 50)
    assert find_red_box(frames[0]) is None


# ---- behaviour -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 128, 256])
def test_every_renderer_supports_64_128_256(size, tmp_path):
    spec = RenderSpec(height=size, width=size)
    shape = (size, size, 3)
    assert TextRenderer(spec).render_text("hello world").shape == (2, *shape)
    assert render_image(test_image(), spec).shape == (1, *shape)
    assert render_audio(write_tone_wav(tmp_path / "a.wav"), spec).shape == (1, *shape)
    assert render_video(TEST_DATA / "moving_square.mp4", spec, 4).shape == (4, *shape)


def test_text_token_fills_the_frame_width():
    """Paper sizing: size = min(W * 1.65 / len, W) with a 0.6 em advance spans ~99% of W."""
    frame = TextRenderer(RenderSpec()).render_token("abcdefgh")
    cols = np.nonzero(frame[..., 0].max(0) > 0)[0]
    assert cols.max() - cols.min() + 1 >= 56, "an 8-letter token should span most of 64 px"
    assert frame[..., 0].max() == 255 and frame[0, 0, 0] == 0, "white on black"


def test_long_tokens_are_cut_so_glyphs_stay_legible():
    text = TextRenderer(RenderSpec(max_token_chars=8))
    assert text.tokenize("antidisestablishment") == ["antidise", "stablish", "ment"]


def test_split_words_separates_punctuation():
    assert split_words("it 's a well-made, fun film...") == [
        "it",
        "'",
        "s",
        "a",
        "well",
        "-",
        "made",
        ",",
        "fun",
        "film",
        ".",
        ".",
        ".",
    ]
    assert split_words("  ") == []


def test_glyph_cache_returns_identical_frames_and_is_bounded():
    text = TextRenderer(RenderSpec(), cache_size=3)
    a = text.render_token("alpha")
    assert text.render_token("alpha") is a
    assert np.array_equal(a, text.uncached_render_token("alpha"))
    for w in ["b", "c", "d", "e"]:
        text.render_token(w)
    assert len(text._cache) == 3 and "alpha" not in text._cache
    with pytest.raises(ValueError):
        a[0, 0, 0] = 1  # cached frames are read-only, so no caller can corrupt the cache


def test_renderers_are_pure_functions_of_input_and_spec(tmp_path):
    wav = write_tone_wav(tmp_path / "a.wav")
    assert np.array_equal(render_audio(wav, RenderSpec()), render_audio(wav, RenderSpec()))
    a = TextRenderer(RenderSpec()).render_text("same words")
    b = TextRenderer(RenderSpec()).render_text("same words")
    assert np.array_equal(a, b)


def test_audio_sample_rate_is_explicit(tmp_path):
    """An 8 kHz and a 48 kHz recording of the same sound give nearly the same spectrogram."""
    lo = render_audio(write_tone_wav(tmp_path / "lo.wav", 8000), RenderSpec())
    hi = render_audio(write_tone_wav(tmp_path / "hi.wav", 48000), RenderSpec())
    assert np.abs(lo.astype(float) - hi.astype(float)).mean() < 12


def test_render_spec_hash_is_stable_and_covers_everything(tmp_path):
    base = RenderSpec()
    assert base.hash == RenderSpec().hash and len(base.hash) == 16
    variants = [
        RenderSpec(height=128, width=128),
        RenderSpec(font_scale=1.5),
        RenderSpec(audio=AudioSpec(n_mels=32)),
        RenderSpec(fit="crop"),
    ]
    assert len({base.hash, *(v.hash for v in variants)}) == 5
    # the font is hashed by content: a copy elsewhere keeps the hash, an edit changes it
    copy = tmp_path / "font.ttf"
    copy.write_bytes(base.font_path.read_bytes())
    assert RenderSpec(font=str(copy)).hash == base.hash
    copy.write_bytes(base.font_path.read_bytes() + b"\0")
    assert RenderSpec(font=str(copy)).hash != base.hash


def test_uniform_indices():
    assert uniform_indices(5, 8) == [0, 1, 2, 3, 4]
    assert uniform_indices(100, 4) == [12, 37, 62, 87]
    idx = uniform_indices(132, 16)
    assert len(set(idx)) == 16 and idx == sorted(idx) and idx[-1] < 132


def test_build_clip_layout_and_masks():
    spec = RenderSpec()
    text = TextRenderer(spec)
    image = render_image(test_image(), spec)
    clip = build_clip(text, "count", image, text.render_text("three"))
    assert clip.frames.shape == (4, 64, 64, 3)
    assert clip.loss_mask.tolist() == [False, False, False, True]
    assert clip.segments == {"task": 1, "input": 1, "separator": 1, "output": 1}
    assert np.array_equal(clip.frames[2], text.separator())
    pretrain = build_clip(text, "text", text.render_text("a b c"))
    assert pretrain.loss_mask.tolist() == [False, True, True, True]
    with pytest.raises(ValueError, match="expected"):
        build_clip(text, "t", np.zeros((1, 32, 32, 3), np.uint8))


# ---- what the font cannot draw, silence, display matrices, the renderer version ------------


def test_characters_the_font_lacks_are_drawn_as_their_code_points():
    """Emoji (not in DejaVu Sans Mono), control and format characters each become a token of
    their own drawn as ``U+XXXX``: distinct characters give distinct frames, never one shared
    missing-glyph box; ASCII tokens are untouched."""
    text = TextRenderer(RenderSpec())
    assert text.tokenize("ok\U0001f600\U0001f601 a\u200db nul\x00") == [
        "ok", "\U0001f600", "\U0001f601", "a", "\u200d", "b", "nul", "\x00"
    ]  # fmt: skip
    grin, beam = text.render_token("\U0001f600"), text.render_token("\U0001f601")
    assert not np.array_equal(grin, beam)
    assert np.array_equal(grin, text.render_token("U+1F600"))
    box = text.uncached_render_token("\U0010fffd")  # a code point no font has
    assert not np.array_equal(grin, box) and not np.array_equal(beam, box)
    assert text.shown("caf\u00e9") == "caf\u00e9" and text.drawable("\u00e9")  # in the font
    assert text.shown("\x00\ud800") == "U+0000U+D800"  # never handed to FreeType as text
    assert text.tokenize("The cat, 42 times!") == ["The", "cat", ",", "42", "times", "!"]


def test_font_coverage_matches_fonttools():
    tt = pytest.importorskip("fontTools.ttLib")
    from evav.frames.text import FontCoverage

    path = RenderSpec().font_path
    reference = set(tt.TTFont(str(path)).getBestCmap())
    coverage = FontCoverage.of(path)
    assert {c for c in range(0x30000) if c in coverage} == reference


def test_a_file_that_is_not_a_font_is_refused_once(tmp_path):
    bad = tmp_path / "font.ttf"
    bad.write_bytes(b"not a font at all" * 10)
    with pytest.raises(ValueError, match="not a font FreeType can load"):
        TextRenderer(RenderSpec(font=str(bad)))


def test_render_spec_hash_covers_the_renderer_version(monkeypatch):
    import evav.frames.spec as spec_module

    assert RenderSpec().identity()["renderer_version"] == spec_module.RENDERER_VERSION == 2
    now = RenderSpec().hash
    monkeypatch.setattr(spec_module, "RENDERER_VERSION", 1)
    assert RenderSpec().hash != now


def test_digital_silence_is_a_black_spectrogram():
    from evav.frames.audio import log_mel

    assert log_mel(np.zeros(4000, np.float32), AudioSpec()).max() == 0.0
    with pytest.raises(ValueError, match="silent"):
        render_audio(np.zeros(4000, np.float32), RenderSpec())


@pytest.mark.parametrize(
    "degrees, hflip, vflip, method",
    [
        (0, True, False, Image.Transpose.FLIP_LEFT_RIGHT),
        (0, False, True, Image.Transpose.FLIP_TOP_BOTTOM),
        (90, True, False, Image.Transpose.TRANSVERSE),
        (0, False, False, None),
    ],
    ids=["hflip", "vflip", "rot90-hflip", "none"],
)
def test_mp4_display_matrix_flips_like_ffmpeg(tmp_path, degrees, hflip, vflip, method):
    """ffmpeg's autorotate (fftools/ffmpeg_filter.c): a mirrored phone video is shown mirrored
    back; the rotated one plus a flip is the anti-transpose."""
    import av

    rgb = test_image(32, 16)
    path = tmp_path / "m.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=4)
        s.width, s.height, s.pix_fmt, s.options = 32, 16, "yuv444p", {"qp": "0"}
        s.set_display_rotation(degrees, hflip=hflip, vflip=vflip)
        c.mux(s.encode(av.VideoFrame.from_ndarray(np.asarray(rgb), format="rgb24")))
        c.mux(s.encode(None))
    with av.open(str(path)) as c:
        stored = Image.fromarray(next(c.decode(video=0)).to_ndarray(format="rgb24"))
    want = stored if method is None else stored.transpose(method)
    got = render_video(path, RenderSpec(), 1)
    assert np.array_equal(got[0], np.asarray(want.resize((64, 64), Image.BICUBIC)))
