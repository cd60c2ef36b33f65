"""Confidence-based early exit (BranchyNet): a sample leaves at the first exit whose softmax
entropy is at most that exit's threshold; the final exit takes everyone left.

Calibration: given a budget `max_loss` (accuracy points, as a fraction, that early exit may cost
against the final exit alone), thresholds are set on validation data. All exits share one
confidence level p in [0, 1]: exit i's threshold is the p-quantile of its validation entropies,
so p = 0 keeps every sample to the end and p = 1 lets every sample leave at exit 0. The chosen p
is the largest on a grid such that every level up to it stays within the budget; a larger budget
therefore never lowers a threshold. Thresholds are stored in `gm.meta[EXITS][i]["threshold"]`
(the final exit's is `inf`; `-inf` means no sample leaves there).

The run-time rule (`entropy`, `exit_index`) needs numpy only, not torch, so a device can use it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgecut.errors import ExitError


def entropy(logits) -> np.ndarray:
    """Softmax entropy in nats of each row of `logits` ([n, classes] array or tensor)."""
    z = np.asarray(logits.detach() if hasattr(logits, "detach") else logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(axis=-1)


def exit_index(entropies: np.ndarray, thresholds) -> np.ndarray:
    """Exit each sample leaves at: the first i with entropies[:, i] <= thresholds[i]; the last
    exit when none is confident enough. `entropies` is [n, exits]."""
    h = np.asarray(entropies, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64)
    confident = h[:, :-1] <= t[None, :-1]
    first = np.argmax(confident, axis=1)
    return np.where(confident.any(axis=1), first, h.shape[1] - 1)


@dataclass(frozen=True)
class EarlyExitReport:
    """What early exit does on one data set."""
    thresholds: tuple[float, ...]   # per exit, entropy in nats (final: inf)
    fractions: tuple[float, ...]    # share of samples leaving at each exit
    accuracy: float                 # accuracy with early exit
    final_accuracy: float           # accuracy of the final exit alone, same data
    exit_accuracy: tuple[float, ...]  # accuracy of each exit alone, same data
    macs: float                     # expected MACs per sample (backbone to the exit + heads passed)
    full_macs: int                  # MACs of the backbone alone (the final exit without heads)
    max_loss: float | None = None   # the budget the thresholds were calibrated to, if any
    level: float | None = None      # the shared confidence level p of the calibration

    def table(self) -> str:
        """A plain-text table: one row per exit, then the totals."""
        rows = ["exit  threshold  leaves here  accuracy alone"]
        for i, (t, f, a) in enumerate(zip(self.thresholds, self.fractions, self.exit_accuracy)):
            rows.append(f"{i:>4}  {t:>9.4f}  {100 * f:>10.1f}%  {100 * a:>13.2f}%")
        share = 100 * self.macs / self.full_macs
        rows.append(f"early exit accuracy {100 * self.accuracy:.2f}% (final exit alone "
                    f"{100 * self.final_accuracy:.2f}%), MACs {self.macs / 1e6:.2f}M of "
                    f"{self.full_macs / 1e6:.2f}M ({share:.0f}%)")
        return "\n".join(rows)


def _outcomes(gm, data) -> tuple[np.ndarray, np.ndarray]:
    from edgecut.exits.train import exit_logits

    logits, y = exit_logits(gm, data)
    h = np.stack([entropy(z) for z in logits], axis=1)
    correct = np.stack([(z.argmax(1) == y).numpy() for z in logits], axis=1)
    return h, correct


def _costs(gm) -> tuple[list[float], int]:
    """MACs a sample spends when it leaves at exit i (its own MACs plus every earlier head's),
    and the MACs of the final exit alone (the plain backbone)."""
    from edgecut.frontend import meta as M
    from edgecut.exits.train import exits_of

    exits = exits_of(gm)
    head = [0] * len(exits)
    for n in gm.graph.nodes:
        if M.EXIT_ID in n.meta:
            head[n.meta[M.EXIT_ID]] += n.meta.get(M.MACS, 0)
    return [e["macs"] + sum(head[:i]) for i, e in enumerate(exits)], exits[-1]["macs"]


def _report(h, correct, thresholds, costs, full_macs, **extra) -> EarlyExitReport:
    where = exit_index(h, thresholds)
    n, k = correct.shape
    fractions = np.bincount(where, minlength=k) / n
    return EarlyExitReport(
        thresholds=tuple(float(t) for t in thresholds), fractions=tuple(float(f) for f in fractions),
        accuracy=float(correct[np.arange(n), where].mean()), final_accuracy=float(correct[:, -1].mean()),
        exit_accuracy=tuple(float(a) for a in correct.mean(axis=0)),
        macs=float(np.dot(fractions, costs)), full_macs=int(full_macs), **extra)


def _thresholds_at(h: np.ndarray, level: float) -> list[float]:
    k = h.shape[1]
    if level <= 0:
        return [-math.inf] * (k - 1) + [math.inf]
    return [float(np.quantile(h[:, i], level)) for i in range(k - 1)] + [math.inf]


def calibrate_thresholds(gm, val, max_loss: float = 0.01, *, grid: int = 200, store: bool = True) -> EarlyExitReport:
    """Entropy thresholds for every exit of the trained `gm` such that early exit loses at most
    `max_loss` accuracy (a fraction: 0.01 is one point) against the final exit on `val`.
    Stores them in `gm.meta[EXITS][i]["threshold"]` when `store`. Returns the report on `val`."""
    if not (isinstance(max_loss, (int, float)) and 0 <= max_loss <= 1):
        raise ExitError(f"max_loss is a fraction of accuracy in [0, 1] (0.01 = one point), got {max_loss!r}")
    if grid < 1:
        raise ExitError(f"grid must be at least 1, got {grid}")
    h, correct = _outcomes(gm, val)
    costs, full = _costs(gm)
    target = correct[:, -1].mean() - max_loss - 1e-12
    best = 0.0
    for level in np.linspace(0.0, 1.0, grid + 1)[1:]:
        if correct[np.arange(len(h)), exit_index(h, _thresholds_at(h, level))].mean() < target:
            break
        best = float(level)
    thresholds = _thresholds_at(h, best)
    if store:
        from edgecut.exits.train import exits_of
        for entry, t in zip(exits_of(gm), thresholds):
            entry["threshold"] = t
    return _report(h, correct, thresholds, costs, full, max_loss=float(max_loss), level=best)


def early_exit_report(gm, data, thresholds=None) -> EarlyExitReport:
    """What early exit does on `data` with `thresholds` (default: the ones stored in the graph)."""
    from edgecut.exits.train import exits_of

    if thresholds is None:
        thresholds = [e.get("threshold") for e in exits_of(gm)]
        if any(t is None for t in thresholds):
            raise ExitError("this model has no calibrated thresholds: run edgecut.exits.calibrate_thresholds "
                            "(gm, val_data, max_loss) first, or pass thresholds")
    if len(thresholds) != len(exits_of(gm)):
        raise ExitError(f"need {len(exits_of(gm))} thresholds (one per exit), got {len(thresholds)}")
    h, correct = _outcomes(gm, data)
    return _report(h, correct, list(thresholds), *_costs(gm))
