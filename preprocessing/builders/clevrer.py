"""clevrer: CLEVRER video question answering, video + question -> answer words.

Official layout: question files ``{train,validation,test}.json`` (in ``--src`` or
``--src/questions/``) and videos ``video_{split}/video_{lo}-{hi}/video_{NNNNN}.mp4`` (any
folder below ``--src`` is searched for the file name). A question file is a list of
``{scene_index, video_filename, questions: [...]}``, or an object keyed by scene index.

By default only the open-ended ``descriptive`` questions are used: input = ``num_frames``
video frames then the question's words, output = the answer's words. With
``multiple_choice=true`` every choice of the other questions (explanatory, predictive,
counterfactual) also becomes a sample: video, question, choice -> ``correct`` / ``wrong``.
Questions without an answer (the test set) are skipped; a missing video is quarantined.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evav.errors import BadInputError
from evav.frames import render_video
from preprocessing.builders.base import Builder, Example, Item

SPLITS = {"train": "train", "validation": "val", "test": "test"}


@dataclass
class ClevrerOptions:
    multiple_choice: bool = False
    num_frames: int = 8


def parse_questions(path: str | Path) -> list[dict]:
    """A CLEVRER question file -> ``[{scene_index, video_filename, questions}]`` in file order."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON question file ({e})") from None
    if isinstance(data, dict):  # {"4760": {"questions": [...]}, ...}
        data = [{"scene_index": int(k), **v} for k, v in data.items()]
    if not isinstance(data, list) or not all(
        isinstance(s, dict) and "questions" in s for s in data
    ):
        raise ValueError(f"{path}: expected a list of scenes with 'questions' (CLEVRER layout)")
    for s in data:
        if "scene_index" not in s:
            raise ValueError(f"{path}: a scene has no scene_index")
        s.setdefault("video_filename", f"video_{int(s['scene_index']):05d}.mp4")
    return data


class ClevrerBuilder(Builder):
    name = "clevrer"
    Options = ClevrerOptions
    codec = "h264-444-qp0"

    def list_items(self) -> dict[str, list[Item]]:
        files = {}
        for folder in (self.src, self.src / "questions"):
            for name, split in SPLITS.items():
                if (folder / f"{name}.json").is_file():
                    files.setdefault(split, folder / f"{name}.json")
        self.expect(
            bool(files), "expected CLEVRER question files train.json / validation.json / test.json"
        )
        videos = {p.name: p for p in self.src.rglob("video_*.mp4")}
        out = {}
        for split, path in sorted(files.items()):
            items = []
            for scene in parse_questions(path):
                video = videos.get(scene["video_filename"])
                vid = str(video) if video else None
                for q in scene["questions"]:
                    source = f"{path.name}:{scene['scene_index']}:{q.get('question_id', '?')}"
                    qtype = q.get("question_type", "")
                    if "choices" in q:
                        if not self.options.multiple_choice:
                            continue
                        for c in q["choices"]:
                            if "answer" in c:
                                items.append(
                                    Item(
                                        f"{source}:{c.get('choice_id')}",
                                        (
                                            vid,
                                            scene["video_filename"],
                                            q["question"],
                                            c["choice"],
                                            c["answer"],
                                            qtype,
                                        ),
                                    )
                                )
                    elif "answer" in q:
                        items.append(
                            Item(
                                source,
                                (
                                    vid,
                                    scene["video_filename"],
                                    q["question"],
                                    None,
                                    str(q["answer"]),
                                    qtype,
                                ),
                            )
                        )
            out[split] = items
        return out

    @functools.lru_cache(maxsize=4)  # noqa: B019 - one builder per process; consecutive questions share a video
    def _video(self, path: str) -> np.ndarray:
        return render_video(path, self.spec, self.options.num_frames)

    def example(self, item: Item) -> Example:
        video, name, question, choice, answer, qtype = item.data
        if video is None:
            raise BadInputError(item.source, f"video {name} not found under --src")
        parts = [self._video(video), self.words(question)]
        if choice is not None:
            parts.append(self.words(choice))
        extra = {"question": question, "question_type": qtype, "video": name}
        if choice is not None:
            extra["choice"] = choice
        return Example(
            "clevrer", np.concatenate(parts), self.words(answer), answer, answer, extra=extra
        )


BUILDER = ClevrerBuilder
