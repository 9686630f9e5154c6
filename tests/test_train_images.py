"""The training run's `pred_vs_true` image (evav.train.prediction_sheet): one clip, labelled
with the step, task, sample key and answer, upscaled, padding and a packed row's other clips
left out; on batches from the real loader, padded and packed."""

from __future__ import annotations

import pytest
import torch

from evav.data import DataConfig, Loader
from evav.frames.write import MIN_FRAME_PX
from evav.train import prediction_sheet
from tests.test_hostile_loader import build_synthetic

H = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_synthetic(tmp_path_factory.mktemp("img") / "syn", render={"height": H, "width": H})


def first_batch(d, pad_to: str) -> dict:
    cfg = DataConfig(train=[str(d)], num_workers=0, clip_frames=8, pad_to=pad_to)
    return next(iter(Loader(cfg, batch_size=4, infinite=False)))


def sheet_width(frames: int, scale: int, gap: int = 2) -> int:
    return max((frames * (H + gap) + gap) * scale, 480)


@pytest.mark.parametrize("pad_to", ["longest", "pack"])
def test_sheet_shows_one_clip_upscaled_without_padding(data, pad_to):
    batch = first_batch(data, pad_to)
    pred = batch["frames"].float().div(255)  # a "prediction": any (B, T, H, W, 3) in [0, 1]
    img = prediction_sheet(pred, batch, step=7)
    row = 0
    if pad_to == "pack":
        i = batch["row_first"][row]
        frames = int((batch["segment"][row] == 0).sum())
        assert frames < batch["frames"].shape[1] or batch["segment"][row].max() == 0
    else:
        i = row
        frames = int((~batch["pad_mask"][row]).sum())
    scale = MIN_FRAME_PX // H
    assert img.dtype.name == "uint8" and img.shape[2] == 3
    # the frames after the first, upscaled: the sheet is exactly that wide
    assert img.shape[1] == sheet_width(frames - 1, scale), (img.shape, frames)
    assert img.shape[0] > 2 * H * scale  # two labelled rows of upscaled frames
    assert batch["key"][i] and batch["task"][i]


def test_packed_row_first_names_the_sample_at_each_rows_start(data):
    padded, packed = first_batch(data, "longest"), first_batch(data, "pack")
    assert packed["key"] == padded["key"]  # the same samples, laid out two ways
    length = {k: int((~m).sum()) for k, m in zip(padded["key"], padded["pad_mask"])}
    task_of = dict(zip(padded["key"], padded["task_id"].tolist()))
    assert len(packed["row_first"]) == packed["frames"].shape[0]
    for r, i in enumerate(packed["row_first"]):
        key = packed["key"][i]
        assert int((packed["segment"][r] == 0).sum()) == length[key]
        assert int(packed["task_id"][r, 0]) == task_of[key]
        assert torch.equal(packed["frames"][r, : length[key]], padded["frames"][i, : length[key]])


def test_placeholder_batch_draws_an_empty_sheet(data):
    cfg = DataConfig(train=[str(data)], num_workers=0, clip_frames=8)
    ld = Loader(cfg, batch_size=4, infinite=False)
    batch = ld.placeholder()
    img = prediction_sheet(torch.zeros(batch["frames"].shape), batch, step=1)
    assert img.shape[0] > 0 and img.shape[1] >= 480
