"""``build_model(cfg)``: the model a ModelConfig describes, with its weights initialised."""

from __future__ import annotations

from evav.model.base import NextFrameModel
from evav.model.config import ModelConfig
from evav.model.flat import FlatModel
from evav.model.paper import PaperModel

FAMILIES: dict[str, type[NextFrameModel]] = {"flat": FlatModel, "paper": PaperModel}


def build_model(cfg: ModelConfig) -> NextFrameModel:
    """Resolve the preset, build the family's model and initialise every parameter.

    Under ``with torch.device("meta"):`` this allocates nothing (parameter counting).
    """
    cfg = cfg.resolved()
    model = FAMILIES[cfg.family](cfg)
    model.init_weights()
    return model


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
