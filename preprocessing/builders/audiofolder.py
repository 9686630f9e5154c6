"""audiofolder: any folder of labelled audio clips, audio -> label text; no code to write.

Layout: ``--src`` holds one folder per split and in it one folder per label,
``{split}/{label}/*.wav|flac|mp3|ogg|...`` (the suffixes ``evav render`` reads as audio, in
any case). Each clip becomes a log-mel spectrogram as in ``fsdd``; the answer is the label
folder's name; ``task=NAME`` names the task (default ``audiofolder``). Files are read in sorted
order. A clip that cannot be used (see the audio rows of preprocessing/README.md), a file that
is a symbolic link leading out of ``--src``, or a clip directly in a split folder (no label) is
quarantined; a split or label folder that leads out of ``--src`` stops the build before any work.
"""

from __future__ import annotations

from dataclasses import dataclass

from evav.errors import BadInputError
from evav.frames import render_audio
from evav.frames.cli import AUDIO_SUFFIXES
from preprocessing.builders.base import Builder, Example, Item, check_task, label_folders


@dataclass
class AudioFolderOptions:
    task: str = "audiofolder"

    def __post_init__(self):
        check_task(self.task)


class AudioFolderBuilder(Builder):
    name = "audiofolder"
    Options = AudioFolderOptions

    def list_items(self) -> dict[str, list[Item]]:
        return label_folders(self, AUDIO_SUFFIXES)

    def example(self, item: Item) -> Example:
        label, why = item.data
        if why:
            raise BadInputError(item.source, why)
        frames = render_audio(item.source, self.spec)
        return Example(self.options.task, frames, self.words(label), label, label)


BUILDER = AudioFolderBuilder
