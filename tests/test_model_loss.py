"""Next-frame loss: target alignment, masks, per-task values, MS-SSIM at 64x64, fp32."""

from __future__ import annotations

import pytest
import torch

from evav.model import ms_ssim, next_frame_loss
from evav.model.loss import num_scales


def clip_and_perfect_pred(B: int = 3, T: int = 5, size: int = 64):
    frames = torch.rand(B, T, size, size, 3)
    pred = torch.rand(B, T, size, size, 3)
    pred[:, :-1] = frames[:, 1:]  # pred[:, t] is frame t + 1
    return frames, pred


def test_a_perfect_prediction_of_the_next_frame_has_zero_loss():
    frames, pred = clip_and_perfect_pred()
    mask = torch.ones(3, 5, dtype=torch.bool)
    loss, _ = next_frame_loss(pred, frames, mask)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    # scored against the same frame instead of the next one it is far from zero
    loss_same, _ = next_frame_loss(frames, frames, mask)
    assert loss_same.item() > 0.5


def test_only_selected_target_frames_count():
    frames, pred = clip_and_perfect_pred()
    pred[:, 2] = 1 - frames[:, 3]  # a wrong prediction of frame 3
    loss_mask = torch.ones(3, 5, dtype=torch.bool)
    assert next_frame_loss(pred, frames, loss_mask)[0].item() > 0.1
    loss_mask[:, 3] = False
    assert next_frame_loss(pred, frames, loss_mask)[0].item() == pytest.approx(0, abs=1e-5)
    loss_mask[:, 3] = True
    pad_mask = torch.zeros(3, 5, dtype=torch.bool)
    pad_mask[:, 3:] = True
    assert next_frame_loss(pred, frames, loss_mask, pad_mask)[0].item() == pytest.approx(
        0, abs=1e-5
    )


def test_per_task_losses_are_each_tasks_own_mean():
    frames, pred = clip_and_perfect_pred(B=3)
    pred[1, 1] = 0.5  # clip 1 (task 7) is wrong on one of its 4 targets
    mask = torch.ones(3, 5, dtype=torch.bool)
    tasks = torch.tensor([2, 7, 2])
    loss, per_task = next_frame_loss(pred, frames, mask, task_ids_B=tasks)
    assert set(per_task) == {2, 7}
    assert per_task[2].item() == pytest.approx(0, abs=1e-5)
    alone, _ = next_frame_loss(pred[1:2], frames[1:2], mask[1:2])
    assert per_task[7].item() == pytest.approx(alone.item(), rel=1e-5)
    assert loss.item() == pytest.approx(alone.item() / 3, rel=1e-5)  # 4 of 12 frames
    assert not per_task[7].requires_grad


def test_nothing_selected_gives_a_zero_that_backpropagates():
    frames, pred = clip_and_perfect_pred()
    pred.requires_grad_(True)
    loss, per_task = next_frame_loss(pred, frames, torch.zeros(3, 5, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0 and per_task == {} and torch.isfinite(pred.grad).all()


def test_ms_ssim_at_64x64_with_a_3x3_window():
    assert num_scales(64, 64, 3) == 5 and num_scales(32, 32, 3) == 4
    x = torch.rand(4, 3, 64, 64)
    assert torch.allclose(ms_ssim(x, x), torch.ones(4))
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    other = torch.rand(4, 3, 64, 64)
    s_noisy, s_other = ms_ssim(noisy, x), ms_ssim(other, x)
    assert (s_other < s_noisy).all() and (s_noisy < 1).all()
    black = torch.zeros(2, 3, 64, 64)  # text frames are mostly black: no NaN
    y = black.clone().requires_grad_(True)
    ms_ssim(y, black.roll(1, -1)).sum().backward()
    assert torch.isfinite(y.grad).all()


def test_loss_is_fp32_under_bf16_autocast():
    frames, pred = clip_and_perfect_pred()
    mask = torch.ones(3, 5, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = next_frame_loss(pred.bfloat16(), frames, mask)
    assert loss.dtype == torch.float32


def test_bad_shapes_raise_value_error():
    frames, pred = clip_and_perfect_pred()
    with pytest.raises(ValueError, match="pred"):
        next_frame_loss(pred[:, :4], frames, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="loss_mask"):
        next_frame_loss(pred, frames, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="task_ids"):
        next_frame_loss(pred, frames, torch.ones(3, 5, dtype=torch.bool), task_ids_B=torch.zeros(2))
