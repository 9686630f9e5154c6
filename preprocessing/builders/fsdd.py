"""fsdd: Free Spoken Digit Dataset, audio -> digit word.

Official layout: ``recordings/{digit}_{speaker}_{take}.wav``; the official split puts takes
0-4 in test and the rest in train. A name that does not parse, or a digit outside 0-9, is a
mislabelled input and is quarantined, as are unreadable, empty or truncated files.
"""

from __future__ import annotations

import re

from evav.errors import BadInputError
from evav.frames import render_audio
from preprocessing.builders.base import Builder, Example, Item, NoOptions

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NAME = re.compile(r"^([0-9]+)_([A-Za-z]+)_([0-9]+)$")


def digit_example(builder: Builder, task: str, path: str, digit: int, extra: dict) -> Example:
    """Shared by the spoken-digit builders: a spectrogram in, the digit word out."""
    word = DIGITS[digit]
    return Example(
        task, render_audio(path, builder.spec), builder.words(word), word, digit, extra=extra
    )


class FsddBuilder(Builder):
    name = "fsdd"
    Options = NoOptions

    def list_items(self) -> dict[str, list[Item]]:
        rec = self.src / "recordings"
        self.expect(
            rec.is_dir(), "expected the FSDD layout recordings/{digit}_{speaker}_{take}.wav"
        )
        wavs = sorted(rec.glob("*.wav"))
        self.expect(bool(wavs), f"{rec}: no .wav files")
        out: dict[str, list[Item]] = {"train": [], "test": []}
        for w in wavs:
            m = NAME.match(w.stem)
            split = "test" if m and int(m.group(3)) < 5 else "train"
            digit = int(m.group(1)) if m and int(m.group(1)) <= 9 else None
            out[split].append(Item(str(w), stratum=digit))
        return out

    def example(self, item: Item) -> Example:
        stem = item.source.rpartition("/")[2].removesuffix(".wav")
        m = NAME.match(stem)
        if m is None or not 0 <= int(m.group(1)) <= 9:
            raise BadInputError(item.source, "name is not {digit 0-9}_{speaker}_{take}.wav")
        digit, speaker, take = int(m.group(1)), m.group(2), int(m.group(3))
        return digit_example(self, "fsdd", item.source, digit, {"speaker": speaker, "take": take})


BUILDER = FsddBuilder
