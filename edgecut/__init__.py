"""edgecut: split a PyTorch model between an end device and an edge server so that inference
meets a latency deadline at the current bandwidth with the best accuracy it can (Edgent)."""
from __future__ import annotations

__version__ = "0.1.0"

from edgecut.errors import EdgecutError  # noqa: E402
from edgecut.frontend.trace import trace  # noqa: E402
from edgecut.types import Cut, Link, Plan, PlanTable  # noqa: E402

__all__ = ["Cut", "EdgecutError", "Link", "Plan", "PlanTable", "__version__", "trace"]
