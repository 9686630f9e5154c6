"""Frames: every modality rendered as ``(T, H, W, 3)`` uint8 clips, and read back.

    from evav.frames import RenderSpec, TextRenderer, render_audio, build_clip
    spec = RenderSpec()                                   # 64x64, the paper's settings
    text = TextRenderer(spec)
    clip = build_clip(text, task="fsdd", inputs=render_audio("7_george_5.wav", spec),
                      outputs=text.render_text("seven"))

One module per modality; all are pure functions of their input and the RenderSpec (the text
renderer keeps only a cache of the frames it already drew).
"""

from evav.errors import BadInputError
from evav.frames.audio import load_audio, render_audio
from evav.frames.boxes import draw_box, find_red_box
from evav.frames.clip import Clip, build_clip
from evav.frames.image import fit_image, load_image, render_image
from evav.frames.readback import TemplateDecoder
from evav.frames.spec import AudioSpec, RenderSpec
from evav.frames.text import TextRenderer, split_words
from evav.frames.video import render_video, uniform_indices
from evav.frames.write import contact_sheet, save_clip

__all__ = [
    "AudioSpec",
    "BadInputError",
    "Clip",
    "RenderSpec",
    "TemplateDecoder",
    "TextRenderer",
    "build_clip",
    "contact_sheet",
    "draw_box",
    "find_red_box",
    "fit_image",
    "load_audio",
    "load_image",
    "render_audio",
    "render_image",
    "render_video",
    "save_clip",
    "split_words",
    "uniform_indices",
]
