"""synthetic: a built-in task suite over every modality pair; no download, deterministic from a seed.

    evav preprocess synthetic --out shards/synthetic [train_per_task=1000 val_per_task=100]

Tasks (small answer vocabularies and short clips, so a small model learns them in minutes):

| task        | input -> output                          | clip                                   |
|-------------|------------------------------------------|----------------------------------------|
| `count`     | image of 1-4 shapes -> number word       | task, image, sep, word (4 frames)      |
| `pitch`     | 1-3 beeps at one of 4 pitches -> word    | task, spectrogram, sep, word (4)       |
| `add`       | "two plus three" -> "five" (0-4 + 0-4)   | task, 3 words, sep, word (6)           |
| `next`      | a bouncing square -> its next 2 frames   | task, 4 frames, sep, 2 frames (8)      |
| `direction` | a moving square + "which way" -> word    | task, 3 frames, 2 words, sep, word (8) |

Item ``i`` of a split is task ``tasks[i % len(tasks)]``, drawn from ``rng(split, task, i)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from evav.frames import render_audio, render_image
from preprocessing.builders.base import Builder, Example, Item

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight"]
PITCHES = {"low": 300.0, "mid": 600.0, "high": 1200.0, "top": 2400.0}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
COLOURS = [(255, 64, 64), (64, 255, 64), (64, 128, 255), (255, 255, 64), (255, 255, 255)]
TASKS = ["count", "pitch", "add", "next", "direction"]
MAX_PER_TASK = 10_000_000  # inputs are listed up front: a typo must not fill memory


@dataclass
class SyntheticOptions:
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    train_per_task: int = 1000
    val_per_task: int = 100

    def __post_init__(self):
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown or not self.tasks:
            raise ValueError(f"tasks: unknown {unknown}; choose from {TASKS}")
        for name in ("train_per_task", "val_per_task"):
            if not 0 <= getattr(self, name) <= MAX_PER_TASK:
                raise ValueError(f"{name} must be in 0..{MAX_PER_TASK}, got {getattr(self, name)}")


class SyntheticBuilder(Builder):
    name = "synthetic"
    Options = SyntheticOptions
    needs_src = False

    def list_items(self) -> dict[str, list[Item]]:
        tasks = self.options.tasks
        out = {}
        for split, per_task in (
            ("train", self.options.train_per_task),
            ("val", self.options.val_per_task),
        ):
            n = per_task * len(tasks)
            picks = [tasks[i % len(tasks)] for i in range(n)]
            out[split] = [
                Item(f"synthetic:{split}:{i}", (split, t), t) for i, t in enumerate(picks)
            ]
        return out

    def example(self, item: Item) -> Example:
        split, task = item.data
        rng = self.rng(split, task, item.source)
        return getattr(self, f"_{task}")(rng)

    # -- tasks ------------------------------------------------------------------------------
    def _count(self, rng: np.random.Generator) -> Example:
        h, w = self.spec.height, self.spec.width
        n = int(rng.integers(1, 5))
        img = Image.new("RGB", (w, h), (0, 0, 0))
        draw = ImageDraw.Draw(img)
        cells = rng.permutation(9)[:n]  # one shape per cell of a 3x3 grid: never overlapping
        for c in cells:
            cy, cx = divmod(int(c), 3)
            size = rng.uniform(0.15, 0.25) * min(h, w)
            x = (cx + 0.5) * w / 3 + rng.uniform(-0.04, 0.04) * w
            y = (cy + 0.5) * h / 3 + rng.uniform(-0.04, 0.04) * h
            box = (x - size / 2, y - size / 2, x + size / 2, y + size / 2)
            colour = COLOURS[int(rng.integers(len(COLOURS)))]
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        word = NUMBERS[n]
        return Example("count", render_image(img, self.spec), self.words(word), word, n)

    def _pitch(self, rng: np.random.Generator) -> Example:
        sr = self.spec.audio.sample_rate
        word = list(PITCHES)[int(rng.integers(len(PITCHES)))]
        freq = PITCHES[word] * rng.uniform(0.97, 1.03)
        samples = np.zeros(int(0.8 * sr), np.float32)
        beeps = int(rng.integers(1, 4))
        slot = len(samples) // beeps
        for b in range(beeps):
            dur = int(slot * rng.uniform(0.4, 0.8))
            start = b * slot + int(rng.integers(0, slot - dur + 1))
            t = np.arange(dur) / sr
            env = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)  # 10 ms fades, no clicks
            samples[start : start + dur] += (
                rng.uniform(0.3, 0.9) * env * np.sin(2 * np.pi * freq * t)
            )
        samples += rng.normal(0, 0.003, len(samples)).astype(np.float32)
        return Example("pitch", render_audio(samples, self.spec), self.words(word), word, word)

    def _add(self, rng: np.random.Generator) -> Example:
        a, b = (int(v) for v in rng.integers(0, 5, 2))
        word = NUMBERS[a + b]
        question = f"{NUMBERS[a]} plus {NUMBERS[b]}"
        return Example(
            "add", self.words(question), self.words(word), word, a + b, extra={"question": question}
        )

    def _next(self, rng: np.random.Generator) -> Example:
        frames = self._square_video(rng, 6, speed=(2, 4), direction=None)
        return Example("next", frames[:4], frames[4:], "", None)

    def _direction(self, rng: np.random.Generator) -> Example:
        word = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
        frames = self._square_video(rng, 3, speed=(4, 7), direction=DIRECTIONS[word])
        question = "which way"
        inputs = np.concatenate([frames, self.words(question)])
        return Example(
            "direction", inputs, self.words(word), word, word, extra={"question": question}
        )

    def _square_video(self, rng, num_frames: int, speed, direction) -> np.ndarray:
        """A filled square moving at a constant speed, bouncing off the frame's edges."""
        h, w = self.spec.height, self.spec.width
        s = max(2, round(min(h, w) * 0.2))
        colour = np.array(COLOURS[int(rng.integers(len(COLOURS)))], np.uint8)
        v = rng.uniform(*speed) * min(h, w) / 64
        if direction is None:
            angle = rng.uniform(0, 2 * np.pi)
            vx, vy = v * np.cos(angle), v * np.sin(angle)
            x, y = rng.uniform(0, w - s), rng.uniform(0, h - s)
        else:  # start where the whole path fits, so the direction is never ambiguous
            vx, vy = v * direction[0], v * direction[1]
            span_x, span_y = abs(vx) * (num_frames - 1), abs(vy) * (num_frames - 1)
            x = rng.uniform(0, w - s - span_x) + (span_x if vx < 0 else 0)
            y = rng.uniform(0, h - s - span_y) + (span_y if vy < 0 else 0)
        frames = np.zeros((num_frames, h, w, 3), np.uint8)
        for t in range(num_frames):
            xi, yi = int(round(x)), int(round(y))
            frames[t, yi : yi + s, xi : xi + s] = colour
            x, y = x + vx, y + vy
            if not 0 <= x <= w - s:
                vx, x = -vx, min(max(x, 0), w - s)
            if not 0 <= y <= h - s:
                vy, y = -vy, min(max(y, 0), h - s)
        return frames


BUILDER = SyntheticBuilder
