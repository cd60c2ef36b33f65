"""Exit branches: training (`train_exits`, `evaluate`) and confidence-based early exit
(`calibrate_thresholds`, `early_exit_report`, `entropy`, `exit_index`).

The insertion and lowering passes are `edgecut.passes.insert_exits` and
`edgecut.passes.lower_exit`. Names are imported lazily: the run-time rule in `early_exit`
(`entropy`, `exit_index`) needs numpy only, so a torch-free device can import it.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "train_exits": "edgecut.exits.train",
    "evaluate": "edgecut.exits.train",
    "exit_logits": "edgecut.exits.train",
    "joint_loss": "edgecut.exits.train",
    "calibrate_thresholds": "edgecut.exits.early_exit",
    "early_exit_report": "edgecut.exits.early_exit",
    "EarlyExitReport": "edgecut.exits.early_exit",
    "entropy": "edgecut.exits.early_exit",
    "exit_index": "edgecut.exits.early_exit",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'edgecut.exits' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = sorted(_LAZY)
