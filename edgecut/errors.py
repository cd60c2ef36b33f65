"""Every error a user can cause, in one place.

Each says what was wrong, where, and what to do. CLI commands catch `EdgecutError`
and print its message on one line with exit code 2 (no traceback).
"""
from __future__ import annotations


class EdgecutError(Exception):
    """Base of every error edgecut raises on purpose."""


class UsageError(EdgecutError, ValueError):
    """A bad argument: a model spec, a shape string, a unit, a name that does not exist."""


class TraceError(EdgecutError):
    """The model could not be traced by torch.fx nor by torch.export."""


class PassError(EdgecutError):
    """A graph pass failed; names the pass and the node."""

    def __init__(self, pass_name: str, node: str | None, message: str):
        self.pass_name, self.node = pass_name, node
        where = f" at node {node!r}" if node else ""
        super().__init__(f"pass {pass_name!r} failed{where}: {message}")


class VerifyError(EdgecutError):
    """A graph invariant does not hold (raised by `edgecut.passes.verify`)."""


class ExitError(EdgecutError, ValueError):
    """An exit requested where it cannot go, or data that does not fit the model."""


class ProfileError(EdgecutError):
    """A cost profile of the wrong version or target, or one that is uncalibrated."""


class PlanError(EdgecutError):
    """The solver cannot produce a plan (e.g. no cut candidates at all)."""


class DeadlineWarning(UserWarning):
    """No plan meets the deadline: the solver returns the fastest one, marked infeasible."""


class CodegenError(EdgecutError):
    """TVM or ONNX could not compile a segment; names the op and the node."""


class CodegenWarning(UserWarning):
    """Some segments run on ONNX Runtime because TVM could not build them; names the op and node."""


class ArtifactError(EdgecutError):
    """An artifact that is tampered with, incomplete, or of an unknown format version."""


class ProtocolError(EdgecutError):
    """A malformed or refused frame on the wire."""


class RemoteError(ProtocolError):
    """The edge server answered with an error reply; `code` is its error code (runtime/protocol.py)."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(f"edge server refused ({code}): {message}")
