"""Helpers shared by CLI commands: reading a model spec and an input shape."""
from __future__ import annotations

import torch

from edgecut import zoo
from edgecut.errors import UsageError
from edgecut.units import parse_shape


def load_model_and_input(spec: str, shape_text: str | None, seed: int = 0):
    """(model, name, example input) from 'edgecut.zoo:NAME' / 'file.py:Factory' and '1x3x224x224'."""
    model, name, default = zoo.load_spec(spec)
    shape = parse_shape(shape_text) if shape_text else default
    if shape is None:
        raise UsageError(f"model {spec!r} has no default input shape: pass --input, e.g. --input 1x3x224x224")
    g = torch.Generator().manual_seed(seed)
    return model, name, torch.randn(*shape, generator=g)
