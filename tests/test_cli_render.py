"""`evav render`: text and every file kind to PNG/GIF/MP4; bad files exit non-zero naming the file."""

from __future__ import annotations

import subprocess
import sys

import av
import numpy as np
import pytest
from PIL import Image

from evav.cli import main
from tests.conftest import TEST_DATA


def test_render_text_to_contact_sheet(tmp_path, capsys):
    out = tmp_path / "words.png"
    assert main(["render", "--text", "the movie was great", "--out", str(out)]) == 0
    sheet = np.asarray(Image.open(out))
    assert sheet.shape == (2 + 66, 2 + 4 * 66, 3)  # 4 frames of 64 px with 2 px gaps
    assert "4 frames of 64x64" in capsys.readouterr().out


def test_render_video_to_gif_and_mp4_with_overrides(tmp_path):
    gif, mp4 = tmp_path / "v.gif", tmp_path / "v.mp4"
    src = str(TEST_DATA / "moving_square.mp4")
    assert main(["render", src, "--frames", "5", "--out", str(gif), "height=128", "width=128"]) == 0
    img = Image.open(gif)
    assert img.n_frames == 5 and img.size == (128, 128)
    assert main(["render", src, "--task", "video", "--frames", "5", "--out", str(mp4)]) == 0
    with av.open(str(mp4)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 6


def test_render_audio_and_image(datasets, tmp_path):
    wav = datasets / "fsdd" / "recordings" / "7_george_5.wav"
    jpg = next((datasets / "cifar10" / "test" / "airplane").glob("*.jpg"))
    assert main(["render", str(wav), "--out", str(tmp_path / "a.png"), "audio.window_s=0.1"]) == 0
    assert Image.open(tmp_path / "a.png").size[0] > 66  # several windows
    assert main(["render", str(jpg), "--out", str(tmp_path / "i.png"), "fit=letterbox"]) == 0


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.wav", b"", "empty file"),
        ("noise.jpg", b"\x00\x01garbage" * 50, "not an image"),
        ("noise.mp4", b"\x00\x01garbage" * 50, "not a readable video"),
        ("notes.xyz", b"hello", "cannot tell the modality"),
    ],
)
def test_bad_file_exits_non_zero_naming_it(tmp_path, capsys, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "out.png"
    assert main(["render", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and reason in err
    assert not out.exists(), "no output may appear for a failed render"


def test_bad_override_and_usage_errors(tmp_path, capsys):
    assert main(["render", "--text", "x", "--out", str(tmp_path / "o.png"), "heigth=128"]) == 2
    assert "did you mean 'height'" in capsys.readouterr().err
    out = str(tmp_path / "o.png")
    src = str(TEST_DATA / "moving_square.mp4")
    for args, message in [
        (["--out", out], "give exactly one of --text TEXT or one FILE"),
        (["--text", "x", "--out", str(tmp_path / "o.bmp")], "must end in .png, .gif or .mp4"),
        ([src, "--frames", "0", "--out", out], "--frames must be between 1 and 10000, got 0"),
        ([src, "--frames", "-3", "--out", out], "--frames must be between 1 and 10000, got -3"),
        ([src, "--frames", "99999", "--out", out], "--frames must be between 1 and 10000"),
        (["--text", "x", "--out", out, "font_scale=nan"], "font_scale must be in (0, 100]"),
        (["--text", "x", "--out", out, "audio.top_db=-1"], "audio.top_db must be in (0, 200]"),
        (["--text", "   ", "--out", out], "the text has no tokens to render"),
    ]:
        assert main(["render", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("evav render: error: ") and message in err, (args, err)
        assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_installed_console_script_runs(tmp_path):
    """The `evav` entry point a user types (same interpreter's environment)."""
    exe = [sys.executable, "-m", "evav.cli"]
    done = subprocess.run(
        [*exe, "render", "--text", "hi", "--out", str(tmp_path / "x.gif")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    bad = subprocess.run(
        [*exe, "render", str(tmp_path / "nope.wav"), "--out", str(tmp_path / "y.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "nope.wav: no such file" in bad.stderr
