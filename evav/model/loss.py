"""Next-frame loss: L1 + (1 - MS-SSIM), in fp32, on the target frames the masks select.

    loss, per_task = next_frame_loss(pred_BTHWC, frames_BTHWC, loss_mask_BT, pad_mask_BT, task_ids_B)
    loss.backward()                     # mean over selected frames of L1 + 1 - MS-SSIM
    per_task[3]                         # the same mean over task 3's frames only (detached)

    s = next_frame_loss_sums(pred_BTHWC, frames_BTHWC, loss_mask_BT, pad_mask_BT, task_ids_B, 4)
    (s.total / n_global).backward()     # the trainer divides by the step's frame count, all ranks
    s.tasks_2K                          # per task: loss sum (row 0, detached), frames (row 1)

``next_frame_loss_sums`` is what training uses: sums, not means, so that a frame weighs the same
wherever it lands (a micro-batch's mean would weigh each frame by its batch's composition), and
no host synchronisation (no boolean indexing, no ``.item()``): every frame is scored and the
unselected ones are masked out with ``torch.where`` (their gradient is exactly zero).

``task_ids`` are per row (B,) or per frame (B, T) (a packed row holds clips of several tasks).

``pred[:, t]`` predicts frame ``t + 1``, so target frame ``t >= 1`` is scored against
``pred[:, t - 1]``; frame 0 is never a target. ``loss_mask[b, t]`` (True: supervise frame t, as
in ``Clip.loss_mask``) and ``pad_mask[b, t]`` (True: padding, never scored) are over the clip's
frames, i.e. over targets.

MS-SSIM (Wang et al. 2003) with a small Gaussian window (default 3 x 3, sigma 1.5) and the
standard five scale weights. Each scale halves the frame (2x2 average pool) and the valid
window must fit at the coarsest scale, so the number of scales is the largest ``s <= 5`` with
``min(H, W) / 2**(s - 1) >= window``: 5 scales at 64x64 (64, 32, 16, 8, 4 pixels), 4 at 32x32;
the weights of the scales used are renormalised to sum to 1. Contrast/structure terms are
clamped at a small positive value before the fractional powers (negative correlations would
give NaN).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
C1, C2 = 0.01**2, 0.03**2  # for data range 1


def num_scales(height: int, width: int, window: int = 3) -> int:
    """Scales MS-SSIM uses for a frame size: the valid window must fit at the coarsest one."""
    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and min(height, width) >> scales >= window:
        scales += 1
    return scales


def _blur(x_NCHW: torch.Tensor, kernel_K: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter per channel, 'valid' (no padding)."""
    C, K = x_NCHW.shape[1], kernel_K.numel()
    x = F.conv2d(x_NCHW, kernel_K.view(1, 1, K, 1).expand(C, 1, K, 1), groups=C)
    return F.conv2d(x, kernel_K.view(1, 1, 1, K).expand(C, 1, 1, K), groups=C)


def ms_ssim(
    x_NCHW: torch.Tensor, y_NCHW: torch.Tensor, window: int = 3, sigma: float = 1.5
) -> torch.Tensor:
    """MS-SSIM per image (N,) of images in [0, 1]; 1 means identical."""
    H, W = x_NCHW.shape[-2:]
    if min(H, W) < window:
        raise ValueError(f"frames {H}x{W} are smaller than the MS-SSIM window {window}")
    scales = num_scales(H, W, window)
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], device=x_NCHW.device)
    weights = weights / weights.sum()
    k = torch.arange(window, device=x_NCHW.device, dtype=x_NCHW.dtype) - (window - 1) / 2
    kernel = torch.exp(-(k**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    terms = []
    for scale in range(scales):
        if scale:
            x_NCHW, y_NCHW = F.avg_pool2d(x_NCHW, 2), F.avg_pool2d(y_NCHW, 2)
        mu_x, mu_y = _blur(x_NCHW, kernel), _blur(y_NCHW, kernel)
        var_x = _blur(x_NCHW * x_NCHW, kernel) - mu_x**2
        var_y = _blur(y_NCHW * y_NCHW, kernel) - mu_y**2
        cov = _blur(x_NCHW * y_NCHW, kernel) - mu_x * mu_y
        cs = (2 * cov + C2) / (var_x + var_y + C2)
        if scale == scales - 1:  # luminance only at the coarsest scale
            cs = cs * (2 * mu_x * mu_y + C1) / (mu_x**2 + mu_y**2 + C1)
        terms.append(cs.mean(dim=(1, 2, 3)).clamp(min=1e-4))
    return torch.prod(torch.stack(terms, dim=-1) ** weights, dim=-1)


def _frame_loss(pred_NHWC: torch.Tensor, target_NHWC: torch.Tensor, window: int) -> torch.Tensor:
    """L1 + 1 - MS-SSIM per frame (N,), fp32 frames in [0, 1]."""
    l1_N = (pred_NHWC - target_NHWC).abs().mean(dim=(1, 2, 3))
    ssim_N = ms_ssim(pred_NHWC.permute(0, 3, 1, 2), target_NHWC.permute(0, 3, 1, 2), window)
    return l1_N + 1 - ssim_N


def _check_shapes(pred_BTHWC, frames_BTHWC, loss_mask_BT, pad_mask_BT, task_ids_B) -> None:
    if pred_BTHWC.shape != frames_BTHWC.shape or pred_BTHWC.ndim != 5:
        raise ValueError(
            f"pred {tuple(pred_BTHWC.shape)} and frames {tuple(frames_BTHWC.shape)} "
            "must both be (B, T, H, W, C)"
        )
    B, T = pred_BTHWC.shape[:2]
    for name, m in (("loss_mask", loss_mask_BT), ("pad_mask", pad_mask_BT)):
        if m is not None and (m.shape != (B, T) or m.dtype != torch.bool):
            raise ValueError(
                f"{name} must be a ({B}, {T}) bool tensor, got {m.dtype} {tuple(m.shape)}"
            )
    if task_ids_B is not None and task_ids_B.shape not in ((B,), (B, T)):
        raise ValueError(
            f"task_ids must be ({B},) or, per frame, ({B}, {T}), got {tuple(task_ids_B.shape)}"
        )


def target_select(loss_mask_BT: torch.Tensor, pad_mask_BT: torch.Tensor | None) -> torch.Tensor:
    """(B, T-1) bool: which target frames (1..T-1) are scored; its sum is a batch's weight."""
    select_BT = loss_mask_BT[:, 1:]
    if pad_mask_BT is not None:
        select_BT = select_BT & ~pad_mask_BT[:, 1:]
    return select_BT


class LossSums(NamedTuple):
    total: torch.Tensor  # () fp32: sum over scored frames of L1 + 1 - MS-SSIM (differentiable)
    count: torch.Tensor  # () fp32: frames scored
    tasks_2K: torch.Tensor  # (2, K) fp32, detached: per task, loss sum and frames scored


def next_frame_loss_sums(
    pred_BTHWC: torch.Tensor,
    frames_BTHWC: torch.Tensor,
    loss_mask_BT: torch.Tensor,
    pad_mask_BT: torch.Tensor | None,
    task_ids_B: torch.Tensor,
    num_tasks: int,
    *,
    window: int = 3,
) -> LossSums:
    """The loss as sums over the scored frames, for a caller that normalises them by a count of
    its own (the trainer: all frames of a step, every rank). No host synchronisation. A frame not
    scored adds exactly 0 to the sums and 0 to the gradient (``torch.where``, not a product: a
    non-finite value there stays out of the loss and of the gradient)."""
    _check_shapes(pred_BTHWC, frames_BTHWC, loss_mask_BT, pad_mask_BT, task_ids_B)
    B, T = pred_BTHWC.shape[:2]
    select_N = target_select(loss_mask_BT, pad_mask_BT).reshape(-1)
    with torch.autocast(pred_BTHWC.device.type, enabled=False):
        pred_NHWC = pred_BTHWC[:, :-1].float().flatten(0, 1)
        target_NHWC = frames_BTHWC[:, 1:].flatten(0, 1)
        target_NHWC = (
            target_NHWC.float() / 255
            if not target_NHWC.is_floating_point()
            else target_NHWC.float()
        )
        # unscored frames are scored as the target against itself (masked before the loss, not
        # after: a NaN there would make the gradient NaN through MS-SSIM), then dropped
        keep_N111 = select_N[:, None, None, None]
        pred_NHWC = torch.where(keep_N111, pred_NHWC, target_NHWC)
        loss_N = torch.where(select_N, _frame_loss(pred_NHWC, target_NHWC, window), 0.0)
    weight_N = select_N.float()
    # per row, or per frame (a packed row holds clips of several tasks): the target frame's
    task_N = task_ids_B[:, 1:] if task_ids_B.ndim == 2 else task_ids_B[:, None].expand(B, T - 1)
    task_N = task_N.reshape(-1)
    tasks_2K = torch.zeros(2, num_tasks, device=loss_N.device)
    tasks_2K[0].index_add_(0, task_N, loss_N.detach())
    tasks_2K[1].index_add_(0, task_N, weight_N)
    return LossSums(loss_N.sum(), weight_N.sum(), tasks_2K)


def next_frame_loss(
    pred_BTHWC: torch.Tensor,
    frames_BTHWC: torch.Tensor,
    loss_mask_BT: torch.Tensor,
    pad_mask_BT: torch.Tensor | None = None,
    task_ids_B: torch.Tensor | None = None,
    *,
    window: int = 3,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Scalar loss (mean over selected target frames) and per-task means (detached):
    ``next_frame_loss_sums`` divided by its counts (reads the task count back to the host: for
    tests and tools, not for the training loop).

    ``frames`` float in [0, 1] (uint8 is converted). With no frame selected the loss is a zero
    that still backpropagates, and the dict is empty.
    """
    B = pred_BTHWC.shape[0]
    tasks_B = task_ids_B if task_ids_B is not None else torch.zeros(B, dtype=torch.long)
    tasks_B = tasks_B.to(pred_BTHWC.device)
    num_tasks = int(tasks_B.max()) + 1 if B else 1
    s = next_frame_loss_sums(
        pred_BTHWC, frames_BTHWC, loss_mask_BT, pad_mask_BT, tasks_B, num_tasks, window=window
    )
    per_task: dict[int, torch.Tensor] = {}
    if task_ids_B is not None:
        loss_K, frames_K = s.tasks_2K
        per_task = {k: loss_K[k] / frames_K[k] for k in range(num_tasks) if frames_K[k] > 0}
    return s.total / s.count.clamp(min=1), per_task
