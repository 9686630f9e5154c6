"""clevrer: CLEVRER video question answering, video + question -> answer words.

Official layout: question files ``{train,validation,test}.json`` (in ``--src`` or
``--src/questions/``) and videos ``video_{split}/video_{lo}-{hi}/video_{NNNNN}.mp4`` (any
folder below ``--src`` is searched for the file name). A question file is a list of
``{scene_index, video_filename, questions: [...]}``, or an object keyed by scene index.

By default only the open-ended ``descriptive`` questions are used: input = ``num_frames``
video frames then the question's words, output = the answer's words. With
``multiple_choice=true`` every choice of the other questions (explanatory, predictive,
counterfactual) also becomes a sample: video, question, choice -> ``correct`` / ``wrong``.
Questions without an answer (the test set) are skipped; a missing video, or a question or
choice that is not an object with string ``question``/``choice`` text, is quarantined. A question
file that is not JSON, or not a list of scenes, stops the build (a wrong layout).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evav.errors import BadInputError
from evav.frames import render_video
from preprocessing.builders.base import Builder, Example, Item, check_num_frames, load_json

SPLITS = {"train": "train", "validation": "val", "test": "test"}


@dataclass
class ClevrerOptions:
    multiple_choice: bool = False
    num_frames: int = 8

    def __post_init__(self):
        check_num_frames(self.num_frames)


def parse_questions(path: str | Path) -> list[dict]:
    """A CLEVRER question file -> ``[{scene_index, video_filename, questions}]`` in file order;
    ValueError (naming the file) unless it is a list, or an object keyed by scene index, of
    scenes with an integer ``scene_index`` and a ``questions`` list."""
    path = Path(path)
    data = load_json(path)
    if isinstance(data, dict):  # {"4760": {"questions": [...]}, ...}
        if not all(isinstance(v, dict) for v in data.values()):
            raise ValueError(f"{path}: expected scenes as objects keyed by scene index")
        data = [{"scene_index": k, **v} for k, v in data.items()]
    if not isinstance(data, list) or not all(
        isinstance(s, dict) and isinstance(s.get("questions"), list) for s in data
    ):
        raise ValueError(f"{path}: expected a list of scenes with 'questions' (CLEVRER layout)")
    for s in data:
        if "scene_index" not in s:
            raise ValueError(f"{path}: a scene has no scene_index")
        index = s["scene_index"]
        if isinstance(index, str) and index.isascii() and index.isdigit():
            index = int(index)
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ValueError(f"{path}: scene_index {s['scene_index']!r} is not an integer >= 0")
        s["scene_index"] = index
        s.setdefault("video_filename", f"video_{s['scene_index']:05d}.mp4")
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
        videos: dict[str, Path] = {}
        for p in sorted(self.src.rglob("video_*.mp4")):
            videos.setdefault(p.name, p)  # the same name twice: the first in sorted order
        out = {}
        for split, path in sorted(files.items()):
            items = []
            for scene in parse_questions(path):
                name = scene["video_filename"]
                video = videos.get(name) if isinstance(name, str) else None  # a name, not a path
                vid = str(video) if video else None
                for n, q in enumerate(scene["questions"]):
                    items += self._question_items(path, scene, n, q, vid)
            out[split] = items
        return out

    def _question_items(self, path: Path, scene: dict, n: int, q: object, vid) -> list[Item]:
        """One question's items: data ``(video, name, question, choice, answer, type)``, or
        ``("bad", reason)`` for a malformed question or choice."""
        name = scene["video_filename"]
        if not isinstance(q, dict):
            where = f"{path.name}:{scene['scene_index']}:#{n}"
            return [Item(where, ("bad", "question is not an object"))]
        source = f"{path.name}:{scene['scene_index']}:{q.get('question_id', '?')}"
        question, qtype = q.get("question"), q.get("question_type", "")
        if "choices" in q and not self.options.multiple_choice:
            return []
        if not isinstance(question, str) or not isinstance(qtype, str):
            if "answer" not in q and "choices" not in q:
                return []  # unanswered (the test set): skipped like any other
            return [Item(source, ("bad", "question or question_type is not a string"))]
        if "choices" in q:
            choices = q["choices"] if isinstance(q["choices"], list) else [None]
            items = []
            for k, c in enumerate(choices):
                if not isinstance(c, dict) or not isinstance(c.get("choice"), str):
                    why = "choice is not an object with a string choice"
                    items.append(Item(f"{source}:#{k}", ("bad", why)))
                elif "answer" in c:
                    items.append(
                        Item(
                            f"{source}:{c.get('choice_id')}",
                            (vid, name, question, c["choice"], str(c["answer"]), qtype),
                        )
                    )
            return items
        if "answer" in q:
            return [Item(source, (vid, name, question, None, str(q["answer"]), qtype))]
        return []

    @functools.lru_cache(maxsize=4)  # noqa: B019 - one builder per process; consecutive questions share a video
    def _video(self, path: str) -> np.ndarray:
        return render_video(path, self.spec, self.options.num_frames)

    def example(self, item: Item) -> Example:
        if item.data[0] == "bad":
            raise BadInputError(item.source, item.data[1])
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
