"""Per-layer-kind latency regressors (scikit-learn estimators) and their safe serialisation.

- `LinearLatency`: y = b + w.x, a `LinearRegression`. On Edgent's features this is the paper's
  model (kept for parity); with `positive=True` on the work features (MACs, elements, params) it
  is an additive cost model; on the single "elems" feature (MACs + input + output elements) it is
  the line a kind with too few samples to cross-validate gets.
- `LogLinearLatency`: log(y / work) = b + w.log(1 + x) on the work features: a power law for
  the kernel's efficiency, clipped to the measured range; Duan's smearing factor corrects the
  bias of predicting a mean from a log-space fit.
- `GBTLatency`: gradient-boosted trees on the shape features (channels, kernel, stride, map
  size), predicting the same log-efficiency: schedules are fast or slow by geometry.

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

# candidate name -> (estimator factory, which features it reads, fewest samples it needs)
CANDIDATES = {
    "edgent": (lambda: LinearLatency(), "edgent", 1),
    "elems": (lambda: LinearLatency(positive=True, relative=True), "elems", 1),
    "work": (lambda: LinearLatency(positive=True, relative=True), "work", 1),
    "loglinear": (lambda: LogLinearLatency(), "work", 4),
    "gbt": (lambda: GBTLatency(), "shape", 20),
}


class LinearLatency(RegressorMixin, BaseEstimator):
    """Latency (seconds) = intercept_ + coef_ . x, clipped below at floor_. With `relative=True`
    the squared errors are weighted by 1/y^2 (relative error), so a few slow layers cannot buy a
    large intercept that every small layer then pays."""

    def __init__(self, positive: bool = False, relative: bool = False, floor: float | None = None):
        self.positive = positive
        self.relative = relative
        self.floor = floor

    def fit(self, X, y):
        X, y = check_X_y(X, y, dtype=float)
        w = 1.0 / np.maximum(y, 1e-12) ** 2 if self.relative else None
        lr = LinearRegression(positive=self.positive).fit(X, y, sample_weight=w)
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


def _finish_log_fit(est, X, y, t):
    """Shared end of the log-efficiency fits: clip range, smearing correction (the mean ratio of
    latency to the back-transformed prediction), floor, feature count."""
    est.tmin_, est.tmax_ = float(t.min()), float(t.max())
    est.smear_ = 1.0
    est.smear_ = float(np.mean(y / est._raw(X)))
    est.floor_ = float(est.floor if est.floor is not None else 0.5 * y.min())
    est.n_features_in_ = X.shape[1]
    return est


class LogLinearLatency(RegressorMixin, BaseEstimator):
    """A power law for efficiency: log(seconds / work) = intercept_ + coef_ . log1p(x), a ridge
    regression, with work = 1 + MACs + input + output elements (the first three columns). The
    predicted log-efficiency is clipped to the range seen in training, so a prediction never
    extrapolates to a kernel faster or slower per unit of work than any measured one."""

    def __init__(self, alpha: float = 1.0, floor: float | None = None):
        self.alpha = alpha
        self.floor = floor

    @staticmethod
    def _work(X):
        return 1.0 + X[:, 0] + X[:, 1] + X[:, 2]

    def fit(self, X, y):
        from sklearn.linear_model import Ridge

        X, y = check_X_y(X, y, dtype=float)
        if (y <= 0).any():
            raise ValueError("LogLinearLatency needs positive latencies")
        L, t = np.log1p(np.maximum(X, 0.0)), np.log(y) - np.log(self._work(X))
        lr = Ridge(alpha=self.alpha).fit(L, t)
        self.coef_, self.intercept_ = lr.coef_.astype(float), float(lr.intercept_)
        return _finish_log_fit(self, X, y, t)

    def _raw(self, X):
        t = np.clip(np.log1p(np.maximum(X, 0.0)) @ self.coef_ + self.intercept_, self.tmin_, self.tmax_)
        return np.exp(t) * self._work(X)

    def predict(self, X):
        check_is_fitted(self, "coef_")
        X = check_array(X, dtype=float)
        return np.maximum(self._raw(X) * self.smear_, self.floor_)

    def to_dict(self) -> dict:
        check_is_fitted(self, "coef_")
        return {"type": "loglinear", "coef": [float(c) for c in self.coef_], "intercept": self.intercept_,
                "smear": self.smear_, "floor": self.floor_, "tmin": self.tmin_, "tmax": self.tmax_}


class GBTLatency(RegressorMixin, BaseEstimator):
    """Gradient-boosted trees (scikit-learn) on log1p of the shape features, predicting
    log(seconds per unit of work), work = 1 + MACs + input + output elements (the first three
    columns): the trees learn how efficient a kernel of that geometry is, and the work scales it,
    so predictions extrapolate in size. Trees are kept as plain arrays for JSON."""

    def __init__(self, n_estimators: int = 150, max_depth: int = 3, learning_rate: float = 0.05,
                 floor: float | None = None):
        self.n_estimators, self.max_depth, self.learning_rate, self.floor = n_estimators, max_depth, learning_rate, floor

    @staticmethod
    def _work(X):
        return 1.0 + X[:, 0] + X[:, 1] + X[:, 2]

    def fit(self, X, y):
        from sklearn.ensemble import GradientBoostingRegressor

        X, y = check_X_y(X, y, dtype=float)
        t = np.log(np.maximum(y, 1e-12)) - np.log(self._work(X))
        gbr = GradientBoostingRegressor(n_estimators=self.n_estimators, max_depth=self.max_depth,
                                        learning_rate=self.learning_rate, subsample=0.8, random_state=0)
        gbr.fit(np.log1p(np.maximum(X, 0.0)), t)
        self.init_ = float(np.mean(t)) if not hasattr(gbr.init_, "constant_") else float(np.ravel(gbr.init_.constant_)[0])
        self.trees_ = [{"left": e.tree_.children_left.tolist(), "right": e.tree_.children_right.tolist(),
                        "feature": e.tree_.feature.tolist(), "threshold": e.tree_.threshold.tolist(),
                        "value": e.tree_.value.ravel().tolist()} for e in gbr.estimators_[:, 0]]
        self.lr_ = float(self.learning_rate)
        return _finish_log_fit(self, X, y, t)

    def _raw(self, X):
        L = np.log1p(np.maximum(X, 0.0))
        out = np.full(len(X), self.init_)
        for tree in self.trees_:
            left, right, feat, thr, val = tree["left"], tree["right"], tree["feature"], tree["threshold"], tree["value"]
            for i, row in enumerate(L):
                node = 0
                while left[node] != -1:
                    node = left[node] if row[feat[node]] <= thr[node] else right[node]
                out[i] += self.lr_ * val[node]
        return np.exp(np.clip(out, self.tmin_, self.tmax_)) * self._work(X)

    def predict(self, X):
        check_is_fitted(self, "trees_")
        X = check_array(X, dtype=float)
        return np.maximum(self._raw(X) * self.smear_, self.floor_)

    def to_dict(self) -> dict:
        check_is_fitted(self, "trees_")
        return {"type": "gbt", "init": self.init_, "lr": self.lr_, "trees": self.trees_, "smear": self.smear_,
                "floor": self.floor_, "n_features": self.n_features_in_, "tmin": self.tmin_, "tmax": self.tmax_}


def from_dict(d: dict):
    """A fitted estimator back from `to_dict`'s output."""
    if d["type"] == "gbt":
        est = GBTLatency()
        est.init_, est.lr_, est.trees_, est.smear_ = float(d["init"]), float(d["lr"]), d["trees"], float(d["smear"])
        est.floor_, est.n_features_in_ = float(d["floor"]), int(d["n_features"])
        est.tmin_, est.tmax_ = float(d["tmin"]), float(d["tmax"])
        return est
    coef = np.asarray(d["coef"], dtype=float)
    if d["type"] == "linear":
        est = LinearLatency(positive=bool(d.get("positive", False)))
    elif d["type"] == "loglinear":
        est = LogLinearLatency()
        est.smear_, est.tmin_, est.tmax_ = float(d["smear"]), float(d["tmin"]), float(d["tmax"])
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


def fit_kind(X: dict, y, folds: int = 5, seed: int = 0) -> dict:
    """Fit every candidate on one layer kind's samples; cross-validate (min(folds, n // 2) folds);
    choose by weighted error.

    `X` maps a feature-set name ("edgent", "work", "shape") to its (n, k) matrix; a candidate is
    fitted when its feature set is given and there are enough samples for it.
    Returns a JSON-ready dict: {"models": {name: estimator dict}, "features": {name: feature set},
    "chosen": name, "cv": {name: {"wape", "mdape", "p95"}}, "n": samples}. The chosen model has the
    lowest sum of two out-of-fold errors: the weighted absolute percentage error (sum |error| /
    sum latency, what matters when big layers are summed into a plan) and the median relative
    error (what matters for the many small layers of a segment).
    """
    X = {k: np.asarray(v, float) for k, v in X.items()}
    y = np.asarray(y, float)
    n = len(y)
    out = {"models": {}, "features": {}, "cv": {}, "n": int(n)}
    for name, (make, feats, needs) in CANDIDATES.items():
        if feats not in X or n < needs:
            continue
        out["models"][name] = make().fit(X[feats], y).to_dict()
        out["features"][name] = feats
        k = min(folds, n // 2)
        if k >= 2:
            oof = np.empty(n)
            for tr, te in KFold(k, shuffle=True, random_state=seed).split(y):
                oof[te] = make().fit(X[feats][tr], y[tr]).predict(X[feats][te])
            out["cv"][name] = _scores(y, oof)
    scored = {k: v["wape"] + v["mdape"] for k, v in out["cv"].items()}
    # too few samples to cross-validate: the one-feature line cannot overfit
    out["chosen"] = min(scored, key=scored.get) if scored else ("elems" if "elems" in out["models"] else "work")
    return out
