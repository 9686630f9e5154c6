"""evav.model: pure ``torch.nn`` next-frame predictors over frames in [0, 1].

    from evav.model import ModelConfig, build_model, next_frame_loss, generate
    model = build_model(ModelConfig(preset="paper"))
    pred_BTHWC = model(frames_BTHWC)                 # pred[:, t] predicts frame t + 1
    loss, per_task = next_frame_loss(pred_BTHWC, frames_BTHWC, loss_mask_BT, pad_mask_BT, task_ids_B)
    new_BNHWC = generate(model, prompt_BTHWC, num_frames=4)   # KV-cached

Files: patches.py (frames <-> patch tokens), rope.py, attention.py (spatial/temporal attention,
KV cache), blocks.py, base.py (shared embed/head/init), flat.py and paper.py (the two
families), config.py (ModelConfig, presets), build.py, loss.py, generate.py, flops.py, cli.py
(``evav model-info``). No I/O, no distributed code.
"""

from evav.model.attention import KVCache
from evav.model.base import NextFrameModel
from evav.model.build import build_model, compile_blocks, num_params
from evav.model.config import PRESETS, ModelConfig
from evav.model.flops import forward_flops_per_frame, peak_bf16_flops, train_flops_per_frame
from evav.model.generate import generate, generate_recompute
from evav.model.loss import LossSums, ms_ssim, next_frame_loss, next_frame_loss_sums, target_select

__all__ = [
    "PRESETS",
    "KVCache",
    "ModelConfig",
    "NextFrameModel",
    "build_model",
    "compile_blocks",
    "forward_flops_per_frame",
    "generate",
    "generate_recompute",
    "ms_ssim",
    "next_frame_loss",
    "next_frame_loss_sums",
    "target_select",
    "LossSums",
    "num_params",
    "peak_bf16_flops",
    "train_flops_per_frame",
]
