"""Cost model: profile layers on a target, fit per-layer-kind regressors, the network model."""
