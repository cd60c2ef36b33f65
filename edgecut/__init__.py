"""edgecut: split a PyTorch model between an end device and an edge server so that inference
meets a latency deadline at the current bandwidth with the best accuracy it can (Edgent).

Attributes are imported lazily: a device that runs only its part of an artifact imports
`edgecut` (and `edgecut.load`) without torch installed.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

from edgecut.errors import EdgecutError  # noqa: E402  (torch-free)
from edgecut.types import Cut, Link, Plan, PlanTable  # noqa: E402  (torch-free)

# public name -> "module:attribute", resolved on first use
_LAZY = {
    "trace": "edgecut.frontend.tracing:trace",
    "zoo": "edgecut.zoo:",
    "passes": "edgecut.passes:",
    "targets": "edgecut.targets:",
    "data": "edgecut.data:",                               # digits and synthetic datasets
    "train_exits": "edgecut.exits:train_exits",            # issue: exit branches
    "load": "edgecut.codegen.load:load",                   # torch-free: runs one side of an artifact
    "DeviceRuntime": "edgecut.runtime.client:DeviceRuntime",
    "compile": "edgecut.api:compile",
    "Artifact": "edgecut.api:Artifact",
}


def __getattr__(name: str):
    try:
        module, _, attr = _LAZY[name].partition(":")
    except KeyError:
        raise AttributeError(f"module 'edgecut' has no attribute {name!r}") from None
    value = importlib.import_module(module)
    if attr:
        value = getattr(value, attr)
    globals()[name] = value
    return value


__all__ = ["Cut", "EdgecutError", "Link", "Plan", "PlanTable", "__version__", *_LAZY]
