"""evav.distributed: the pieces that need no process group."""

from __future__ import annotations

import pytest

from evav.distributed import jit_arch_list


@pytest.mark.parametrize(
    "given, want",
    [
        ("9.0a", "9.0"),  # what an H200's CUDA image set: DeepSpeed 0.19 crashed on it
        ("8.0;9.0a;10.0a+PTX", "8.0;9.0;10.0+PTX"),
        ("9.0a 9.0", "9.0"),  # duplicates once the suffix is gone
        ("8.6 9.0", "8.6 9.0"),  # readable lists are left exactly as the user wrote them
        ("7.5+PTX", "7.5+PTX"),
        ("", "9.0"),  # unset: this GPU's capability
        ("  ", "9.0"),
    ],
)
def test_jit_arch_list_drops_arch_specific_suffixes(given, want):
    assert jit_arch_list(given, (9, 0)) == want


def test_default_engine_accumulates_bf16_gradients_in_fp32():
    """The default engine (bf16) runs at ZeRO 1, where DeepSpeed accumulates in fp32; ZeRO 0 with
    bf16, which DeepSpeed cannot accumulate in fp32, gets no fp32 dtype it would refuse."""
    from evav.distributed import EngineConfig, OptimConfig, deepspeed_config

    default = EngineConfig(grad_accum_steps=4)
    ds = deepspeed_config(default, OptimConfig(), micro_batch=2, world_size=3)
    assert (default.precision, default.zero_stage) == ("bf16", 1)
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["train_batch_size"] == 2 * 4 * 3
    zero0 = deepspeed_config(EngineConfig(zero_stage=0, grad_accum_steps=4), OptimConfig(), 2, 1)
    assert "data_types" not in zero0
