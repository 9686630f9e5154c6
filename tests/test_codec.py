"""Clip codec: exact round trips where promised, deterministic bytes, both decoders, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from evav.codec import (
    DETERMINISTIC,
    CodecSpec,
    decode_clip,
    decode_clip_decord,
    decode_clip_pyav,
    encode_clip,
    probe,
)
from evav.frames import RenderSpec, TemplateDecoder, TextRenderer, draw_box


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    """Text frames, a colour gradient and a red box: what shards hold."""
    text = TextRenderer(RenderSpec())
    words = text.render_text("the film is not bad at all")
    y, x = np.mgrid[0:64, 0:64]
    grad = np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8)
    video = draw_box(np.stack([np.roll(grad, 3 * t, axis=1) for t in range(4)]), (10, 12, 40, 50))
    return np.concatenate([words, video])


@pytest.mark.parametrize("name", ["ffv1", "h264-rgb"])
def test_lossless_presets_round_trip_exactly_with_both_decoders(clip, name):
    data = encode_clip(clip, CodecSpec.parse(name))
    assert CodecSpec.parse(name).lossless
    np.testing.assert_array_equal(decode_clip_pyav(data), clip)
    np.testing.assert_array_equal(decode_clip_decord(data), clip)


def test_h264_444_qp0_is_near_lossless_and_keeps_text_and_red_box(clip):
    data = encode_clip(clip, CodecSpec.parse("h264-444-qp0"))
    out = decode_clip(data)
    assert out.shape == clip.shape
    assert np.abs(out.astype(int) - clip).max() <= 3
    text = TextRenderer(RenderSpec())
    words = "the film is not bad at all".split()
    assert TemplateDecoder.for_words(text, words).decode(out[:7]) == words


def test_lossless_encoding_is_deterministic(clip):
    """Byte-identical re-encodes for the lossless presets (the CRF ones are not: evav/codec.py)."""
    for name in DETERMINISTIC:
        spec = CodecSpec.parse(name)
        assert encode_clip(clip, spec) == encode_clip(clip, spec), name


def test_parse_and_str_round_trip():
    spec = CodecSpec.parse("libx264:yuv420p:crf=18")
    assert (spec.codec, spec.pix_fmt, spec.crf, spec.qp) == ("libx264", "yuv420p", 18, None)
    assert CodecSpec.parse(str(spec)) == spec
    assert not spec.lossless
    assert str(CodecSpec.parse("ffv1")) == "ffv1:bgr0"


@pytest.mark.parametrize(
    "text, match",
    [
        ("nope", "expected a preset"),
        ("notacodec:yuv420p", "no such encoder"),
        ("libx264:rgb48le", "does not take pix_fmt"),
        ("libx264:yuv420p:speed=3", "bad option"),
    ],
)
def test_bad_codec_strings_are_value_errors(text, match):
    with pytest.raises(ValueError, match=match):
        CodecSpec.parse(text)


def test_bad_input_frames_and_bytes_are_value_errors(clip):
    with pytest.raises(ValueError, match="uint8"):
        encode_clip(clip.astype(np.float32))
    with pytest.raises(ValueError, match="no frames"):
        encode_clip(clip[:0])
    with pytest.raises(ValueError, match="undecodable"):
        decode_clip(b"not an mp4 at all" * 10)
    with pytest.raises(ValueError, match="undecodable"):
        decode_clip_pyav(b"")


def test_probe_names_codec_and_pixel_format(clip):
    assert probe(encode_clip(clip, CodecSpec.parse("ffv1"))) == "ffv1:bgr0"
    assert probe(encode_clip(clip, CodecSpec.parse("h264-444-qp0"))).startswith("h264:yuv444p")
