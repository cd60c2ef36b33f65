"""Per-layer-kind latency regressors (scikit-learn estimators) and their safe serialisation.

- `LinearLatency`: y = b + w.x, a `LinearRegression`. On Edgent's features this is the paper's
  model (kept for parity); with `positive=True` on the work features (MACs, elements, params) it
  is an additive cost model.
- `LogLinearLatency`: log y = b + w.log(1 + x) on the work features: a power law, which fits
  compiled kernels over orders of magnitude; Duan's smearing factor corrects the bias of
  predicting a mean from a log-space fit.

Every estimator clips its prediction at `floor_` (half the smallest training latency, or a value
given with the paper's coefficients), so no prediction is ever negative. `fit_kind` fits all
candidates, scores them by 5-fold cross-validation and picks the default. `to_dict`/`from_dict`
turn a fitted estimator into plain JSON numbers (never pickle).
"""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.linear_model import LinearRegression
from sklearn.model_selection import KFold
from sklearn.utils.validation import check_is_fitted, check_X_y, check_array

# candidate name -> (estimator factory, which features it reads)
CANDIDATES = {
    "edgent": (lambda: LinearLatency(), "edgent"),
    "work": (lambda: LinearLatency(positive=True), "work"),
    "loglinear": (lambda: LogLinearLatency(), "work"),
}


class LinearLatency(RegressorMixin, BaseEstimator):
    """Latency (seconds) = intercept_ + coef_ . x, clipped below at floor_."""

    def __init__(self, positive: bool = False, floor: float | None = None):
        self.positive = positive
        self.floor = floor

    def fit(self, X, y):
        X, y = check_X_y(X, y, dtype=float)
        lr = LinearRegression(positive=self.positive).fit(X, y)
        self.coef_, self.intercept_ = lr.coef_.astype(float), float(lr.intercept_)
        self.floor_ = float(self.floor if self.floor is not None else max(0.0, 0.5 * y.min()))
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X):
        check_is_fitted(self, "coef_")
        X = check_array(X, dtype=float)
        return np.maximum(X @ self.coef_ + self.intercept_, self.floor_)

    def to_dict(self) -> dict:
        check_is_fitted(self, "coef_")
        return {"type": "linear", "coef": [float(c) for c in self.coef_], "intercept": self.intercept_,
                "floor": self.floor_, "positive": bool(self.positive)}


class LogLinearLatency(RegressorMixin, BaseEstimator):
    """log(latency) = intercept_ + coef_ . log1p(x); prediction exp(...) * smear_, >= floor_."""

    def __init__(self, floor: float | None = None):
        self.floor = floor

    def fit(self, X, y):
        X, y = check_X_y(X, y, dtype=float)
        if (y <= 0).any():
            raise ValueError("LogLinearLatency needs positive latencies")
        L, t = np.log1p(np.maximum(X, 0.0)), np.log(y)
        lr = LinearRegression().fit(L, t)
        self.coef_, self.intercept_ = lr.coef_.astype(float), float(lr.intercept_)
        self.smear_ = float(np.mean(np.exp(t - lr.predict(L))))
        self.floor_ = float(self.floor if self.floor is not None else 0.5 * y.min())
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X):
        check_is_fitted(self, "coef_")
        X = check_array(X, dtype=float)
        y = np.exp(np.log1p(np.maximum(X, 0.0)) @ self.coef_ + self.intercept_) * self.smear_
        return np.maximum(y, self.floor_)

    def to_dict(self) -> dict:
        check_is_fitted(self, "coef_")
        return {"type": "loglinear", "coef": [float(c) for c in self.coef_], "intercept": self.intercept_,
                "smear": self.smear_, "floor": self.floor_}


def from_dict(d: dict):
    """A fitted estimator back from `to_dict`'s output."""
    coef = np.asarray(d["coef"], dtype=float)
    if d["type"] == "linear":
        est = LinearLatency(positive=bool(d.get("positive", False)))
    elif d["type"] == "loglinear":
        est = LogLinearLatency()
        est.smear_ = float(d["smear"])
    else:
        raise ValueError(f"unknown regressor type {d['type']!r}")
    est.coef_, est.intercept_, est.floor_ = coef, float(d["intercept"]), float(d["floor"])
    est.n_features_in_ = len(coef)
    return est


def relative_errors(y_true, y_pred) -> np.ndarray:
    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    return np.abs(y_pred - y_true) / np.maximum(y_true, 1e-12)


def _scores(y, pred) -> dict:
    rel = relative_errors(y, pred)
    return {"wape": float(np.abs(pred - y).sum() / max(y.sum(), 1e-12)), "mdape": float(np.median(rel)),
            "p95": float(np.quantile(rel, 0.95))}


def fit_kind(X_edgent, X_work, y, folds: int = 5, seed: int = 0) -> dict:
    """Fit every candidate on one layer kind's samples; cross-validate (min(folds, n // 2) folds);
    choose by weighted error.

    Returns a JSON-ready dict: {"models": {name: estimator dict}, "features": {name: "edgent"|"work"},
    "chosen": name, "cv": {name: {"wape", "mdape", "p95"}}, "n": samples}. The chosen model has the
    lowest out-of-fold weighted absolute percentage error (sum |error| / sum latency), the error
    that matters when layer predictions are summed into a plan's latency.
    """
    X = {"edgent": np.asarray(X_edgent, float), "work": np.asarray(X_work, float)}
    y = np.asarray(y, float)
    n = len(y)
    out = {"models": {}, "features": {}, "cv": {}, "n": int(n)}
    for name, (make, feats) in CANDIDATES.items():
        out["models"][name] = make().fit(X[feats], y).to_dict()
        out["features"][name] = feats
        k = min(folds, n // 2)
        if k >= 2:
            oof = np.empty(n)
            for tr, te in KFold(k, shuffle=True, random_state=seed).split(y):
                oof[te] = make().fit(X[feats][tr], y[tr]).predict(X[feats][te])
            out["cv"][name] = _scores(y, oof)
    scored = {k: v["wape"] for k, v in out["cv"].items()}
    out["chosen"] = min(scored, key=scored.get) if scored else "work"
    return out
