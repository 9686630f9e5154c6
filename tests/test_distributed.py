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
