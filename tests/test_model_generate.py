"""KV-cached generation equals full recomputation, for both families."""

from __future__ import annotations

import pytest
import torch

from evav.model import KVCache, ModelConfig, build_model, generate, generate_recompute

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.mark.parametrize("preset", ["debug", "paper-debug"])
def test_kv_cache_generation_equals_recomputation(preset):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=preset, init_std=0.1)).eval()
    prompt = torch.rand(2, 3, 64, 64, 3)
    cached = generate(model, prompt, num_frames=5)
    full = generate_recompute(model, prompt, num_frames=5)
    assert cached.shape == (2, 5, 64, 64, 3)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    # the frames really differ from step to step (the check is not vacuous)
    assert (cached[:, 1:] - cached[:, :-1]).abs().max() > 1e-3


def test_kv_cache_prefill_equals_the_full_forward():
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="paper-debug", init_std=0.1)).eval()
    frames = torch.rand(1, 6, 64, 64, 3)
    cache = KVCache(max_frames=6)
    with torch.no_grad():
        stepped = [model(frames[:, :3], cache)] + [
            model(frames[:, t : t + 1], cache) for t in range(3, 6)
        ]
        full = model(frames)
    torch.testing.assert_close(torch.cat(stepped, dim=1), full, atol=1e-5, rtol=0)


def test_generation_rejects_bad_arguments():
    model = build_model(ModelConfig(preset="debug")).eval()
    with pytest.raises(ValueError, match="num_frames"):
        generate(model, torch.rand(1, 2, 64, 64, 3), 0)
    with pytest.raises(ValueError, match="prompt"):
        generate(model, torch.rand(2, 64, 64, 3), 3)
    cache = KVCache(max_frames=3)
    with torch.no_grad():
        model(torch.rand(1, 2, 64, 64, 3), cache)
        with pytest.raises(ValueError, match="one frame at a time"):
            model(torch.rand(1, 2, 64, 64, 3), cache)
        model(torch.rand(1, 1, 64, 64, 3), cache)
        with pytest.raises(ValueError, match="holds 3 frames"):
            model(torch.rand(1, 1, 64, 64, 3), cache)
