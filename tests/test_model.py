"""Model: parameter counts, causality, frame sizes, init coverage, bf16, checkpointing, FLOPs, CLI."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from evav.model import (
    PRESETS,
    ModelConfig,
    build_model,
    forward_flops_per_frame,
    next_frame_loss,
    num_params,
)
from evav.model import cli as model_cli

torch.set_num_threads(min(2, torch.get_num_threads()))

SMALL = ["debug", "paper-debug"]  # one preset per family, fast on CPU


def small_model(preset: str, **kw) -> torch.nn.Module:
    """A test model; init_std 0.1 makes outputs depend visibly on every input."""
    torch.manual_seed(0)
    return build_model(ModelConfig(preset=preset, init_std=0.1, **kw))


def meta_params(preset: str) -> int:
    with torch.device("meta"):
        return num_params(build_model(ModelConfig(preset=preset)))


def test_parameter_counts_of_every_preset():
    counts = {name: meta_params(name) for name in PRESETS}
    assert abs(counts["paper"] - 74e6) / 74e6 < 0.10, counts["paper"]
    assert 0.5e6 < counts["debug"] < 2e6
    assert counts["paper-debug"] < 1e6
    assert counts["S"] < counts["B"] < counts["L"] < counts["XL"]
    assert 1e9 <= counts["XL"] <= 2e9


@pytest.mark.parametrize("preset", SMALL)
def test_changing_a_frame_never_changes_earlier_predictions(preset):
    model = small_model(preset).eval()
    frames = torch.rand(2, 6, 64, 64, 3)
    pred = model(frames)
    for t in (1, 3, 5):
        changed = frames.clone()
        changed[:, t:] = torch.rand_like(changed[:, t:])
        pred2 = model(changed)
        # pred[:, s] sees frames <= s: predictions before t are untouched, from t on they move
        torch.testing.assert_close(pred2[:, :t], pred[:, :t], atol=1e-6, rtol=0)
        assert (pred2[:, t:] - pred[:, t:]).abs().amax(dim=(0, 2, 3, 4)).min() > 1e-4


@pytest.mark.parametrize("preset", SMALL)
@pytest.mark.parametrize("size", [128, 256])
def test_larger_frames_work(preset, size):
    model = small_model(preset, height=size, width=size)
    frames = torch.rand(1, 2, size, size, 3)
    pred = model(frames)
    assert pred.shape == frames.shape
    assert 0 <= pred.min() and pred.max() <= 1


def test_clips_longer_than_any_seen_in_training_run():
    model = small_model("debug").eval()
    pred = model(torch.rand(1, 200, 64, 64, 3))  # rotary time: no maximum length
    assert torch.isfinite(pred).all()


@pytest.mark.parametrize("preset", SMALL)
def test_init_sets_every_parameter(preset):
    model = small_model(preset)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.init_weights()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{name} not initialised"
        assert p.abs().max() <= 1, name
    # residual output projections start smaller than the other linear layers
    stds = {n: p.std().item() for n, p in model.named_parameters() if n.endswith("weight")}
    proj = [s for n, s in stds.items() if n.endswith(("spatial.proj.weight", "mlp.fc2.weight"))]
    qkv = [s for n, s in stds.items() if n.endswith("spatial.qkv.weight")]
    assert max(proj) < min(qkv)


def test_bad_inputs_and_configs_raise_value_error():
    model = small_model("debug")
    with pytest.raises(ValueError, match="expected frames"):
        model(torch.rand(1, 2, 32, 32, 3))
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(1, 2, 64, 64, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model(ModelConfig(preset="huge"))
    with pytest.raises(ValueError, match="divisible"):
        build_model(ModelConfig(height=60))
    with pytest.raises(ValueError, match="window"):
        build_model(ModelConfig(preset="paper", windows=[3, 4, 0]))
    with pytest.raises(ValueError, match="odd-length"):
        build_model(ModelConfig(preset="paper", depths=[1, 1]))


def _train_step(model: torch.nn.Module, frames: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(frames.shape[:2], dtype=torch.bool)
    loss, _ = next_frame_loss(model(frames), frames, mask)
    loss.backward()
    return loss


# Run here: the presets that fit a CPU test in seconds (S and B also pass, more slowly;
# L and XL are not run on CPU). See docs/models.md.
@pytest.mark.parametrize("preset", [*SMALL, "paper"])
def test_bf16_autocast_forward_backward_has_no_nans(preset):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=preset))
    frames = torch.rand(1, 3, 64, 64, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _train_step(model, frames)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("preset", SMALL)
def test_activation_checkpointing_gives_the_same_gradients(preset):
    frames = torch.rand(1, 3, 64, 64, 3)
    grads = []
    for flag in (False, True):
        model = small_model(preset, grad_checkpointing=flag)
        _train_step(model, frames)
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("preset,size", [("debug", 32), ("paper-debug", 64)])
def test_analytic_flops_match_the_flop_counter(preset, size):
    cfg = ModelConfig(preset=preset, height=size, width=size)
    model = build_model(cfg)
    B, T = 2, 5
    frames = torch.rand(B, T, size, size, 3)
    analytic = forward_flops_per_frame(cfg, T) * B * T
    # the math backend decomposes attention into counted matmuls (CPU fused kernels are not)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd:
            pred = model(frames)
        with FlopCounterMode(display=False) as bwd:
            pred.sum().backward()
    assert abs(fwd.get_total_flops() / analytic - 1) < 0.01
    # forward + backward = 3x forward, less the patch embedding's unneeded input gradient
    assert abs((fwd.get_total_flops() + bwd.get_total_flops()) / (3 * analytic) - 1) < 0.03


def test_model_info_prints_every_preset(capsys):
    parser = argparse.ArgumentParser()
    model_cli.add_arguments(parser)
    assert model_cli.main(parser.parse_args(["--frames", "16"])) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert f"| {name} |" in out
    assert "72.6M" in out  # paper
    assert model_cli.main(parser.parse_args(["--presets", "nope"])) == 2
    assert "unknown presets" in capsys.readouterr().err
