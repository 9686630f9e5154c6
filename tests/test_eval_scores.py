"""Evaluation metrics on hand-made predictions with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from evav.eval.scores import (
    box_iou,
    classification,
    colorfulness,
    colour_distribution_consistency,
    multilabel_f1,
    per_frame_quality,
    psnr,
    ssim,
)


def test_classification_known_values():
    true = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    r = classification(pred, true, labels=["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(4 / 6)
    # per class: a P=1 R=2/3 F1=0.8; b P=1/2 R=1/2 F1=0.5; c P=1/2 R=1 F1=2/3
    assert r["f1_macro"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert r["f1_weighted"] == pytest.approx((0.8 * 3 + 0.5 * 2 + 2 / 3 * 1) / 6)
    assert r["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_classification_perfect_and_out_of_vocabulary():
    assert classification(["x", "y"], ["x", "y"])["f1_weighted"] == 1.0
    r = classification(["zzz", "y"], ["x", "y"], labels=["x", "y"])
    assert r["accuracy"] == 0.5 and r["confusion"] == [[0, 0], [0, 1]]
    with pytest.raises(ValueError):
        classification(["a"], ["a", "b"])


def test_multilabel_macro_f1():
    true = [{"walk"}, {"walk", "talk"}, {"run"}]
    pred = [{"walk"}, {"walk"}, {"talk"}]
    r = multilabel_f1(pred, true, ["walk", "talk", "run"])
    # walk: tp2 fp0 fn0 -> 1; talk: tp0 fp1 fn1 -> 0; run: tp0 fp0 fn1 -> 0
    assert r["f1_macro"] == pytest.approx(1 / 3)
    assert r["exact_match"] == pytest.approx(1 / 3)


def test_box_iou():
    assert box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert box_iou((0, 0, 9, 9), (10, 10, 19, 19)) == 0.0
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)
    assert box_iou(None, (0, 0, 1, 1)) == 0.0


def test_colorfulness_and_cdc():
    grey = np.full((2, 8, 8, 3), 128, np.uint8)
    assert colorfulness(grey) == 0.0
    colour = np.zeros((2, 8, 8, 3), np.uint8)
    colour[:, :4, :, 0] = 255
    colour[:, 4:, :, 2] = 255
    assert colorfulness(colour) > 50
    assert colour_distribution_consistency(np.repeat(colour[:1], 3, 0)) == pytest.approx(
        0, abs=1e-9
    )
    flicker = np.stack([colour[0], grey[0], colour[0]])
    assert colour_distribution_consistency(flicker) > 0.3


def test_psnr_ssim_known_values():
    a = np.zeros((16, 16, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255  # one pixel of 768 off by 255: mse = 255^2 / 768
    assert psnr(a, b) == pytest.approx(10 * np.log10(768))
    assert psnr(a, a) == float("inf")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert ssim(img, img) == pytest.approx(1.0)
    noisy = np.clip(img + rng.normal(0, 40, img.shape), 0, 255).astype(np.uint8)
    assert 0 < ssim(noisy, img) < 0.9
    q = per_frame_quality(np.stack([img[None], noisy[None]]), np.stack([img[None], img[None]]))
    assert len(q["psnr_per_frame"]) == 1 and q["n"] == 2


def test_per_frame_quality_refuses_nothing_to_compare():
    empty = np.zeros((1, 0, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="no frames to compare"):
        per_frame_quality(empty, empty)
