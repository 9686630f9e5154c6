"""audiomnist: AudioMNIST spoken digits, audio -> digit word, speaker-disjoint splits.

Official layout: ``data/{speaker}/{digit}_{speaker}_{rep}.wav`` (+ ``audioMNIST_meta.txt``).
Splits are by speaker so no voice is in two splits: if ``train.txt``/``valid.txt``/``test.txt``
(one ``data/..`` path per line, the SpeechBrain split files) sit next to ``data/``, they decide;
otherwise speakers ``valid_speakers`` go to val, ``test_speakers`` to test, the rest to train
(defaults: speaker numbers ending in 1 or 6 -> val, in 0 or 5 -> test, a 60/20/20 cut of the 60
speakers). Files whose digit or speaker disagree with their folder are quarantined.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from evav.errors import BadInputError
from preprocessing.builders.base import Builder, Example, Item, read_lines
from preprocessing.builders.fsdd import digit_example

NAME = re.compile(r"^([0-9]+)_([0-9]+)_([0-9]+)$")
SPLIT_FILES = {"train": "train.txt", "val": "valid.txt", "test": "test.txt"}


@dataclass
class AudioMnistOptions:
    valid_speakers: list[int] = field(
        default_factory=lambda: [s for s in range(1, 61) if s % 5 == 1]
    )
    test_speakers: list[int] = field(
        default_factory=lambda: [s for s in range(1, 61) if s % 5 == 0]
    )


class AudioMnistBuilder(Builder):
    name = "audiomnist"
    Options = AudioMnistOptions

    def list_items(self) -> dict[str, list[Item]]:
        data = self.src / "data"
        self.expect(
            data.is_dir(),
            "expected the AudioMNIST layout data/{speaker}/{digit}_{speaker}_{rep}.wav",
        )
        wavs = sorted(data.glob("*/*.wav"))
        self.expect(bool(wavs), f"{data}: no {{speaker}}/*.wav files")
        out: dict[str, list[Item]] = {"train": [], "val": [], "test": []}
        if all((self.src / f).is_file() for f in SPLIT_FILES.values()):
            listed = {}
            for split, f in SPLIT_FILES.items():
                for line in read_lines(self.src / f):  # only compared with the files found
                    listed[str(self.src / line)] = split
            for w in wavs:
                if str(w) in listed:
                    out[listed[str(w)]].append(Item(str(w), stratum=_digit(w)))
            return out
        val, test = set(self.options.valid_speakers), set(self.options.test_speakers)
        for w in wavs:
            spk = int(w.parent.name) if re.fullmatch("[0-9]+", w.parent.name) else -1
            split = "val" if spk in val else "test" if spk in test else "train"
            out[split].append(Item(str(w), stratum=_digit(w)))
        return out

    def example(self, item: Item) -> Example:
        parent, _, name = item.source.rpartition("/")
        m = NAME.match(name.removesuffix(".wav"))
        folder = parent.rpartition("/")[2]
        if m is None or not 0 <= int(m.group(1)) <= 9:
            raise BadInputError(item.source, "name is not {digit 0-9}_{speaker}_{rep}.wav")
        if m.group(2) != folder:
            raise BadInputError(
                item.source, f"speaker {m.group(2)} in the name, folder says {folder}"
            )
        return digit_example(self, "audiomnist", item.source, int(m.group(1)), {"speaker": folder})


def _digit(path) -> int | None:
    """The digit in a file's name, its --limit stratum (None if the name does not parse)."""
    m = NAME.match(path.stem)
    return int(m.group(1)) if m and int(m.group(1)) <= 9 else None


BUILDER = AudioMnistBuilder
