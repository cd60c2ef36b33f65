"""Profiles built from the Edgent paper's published regressions (its Table 2), and the
uncalibrated Raspberry Pi profiles derived from them.

The paper's lines give milliseconds; profiles hold seconds, so every coefficient is divided by
1000. Its Pi 3B convolution line has a negative intercept (-9.909 ms), valid only over the
layers it was fitted on: every estimator here is clipped below at a floor, the smallest positive
intercept the paper reports for that machine (its dropout line), so no prediction is negative.
The paper ran Chainer layer by layer, without fusion, so an elementwise op costs its own line.

`python -m edgecut.costmodel.paper` rewrites the shipped files `pi3-edgent`, `pi3`, `pi4`, `pi5`;
a test checks that the shipped files equal what this module builds.
"""
from __future__ import annotations


from edgecut.costmodel.profile import PROFILE_DIR, Profile

MS = 1e-3
# kind -> (x coefficients in ms, intercept in ms); features as annotate_layers writes them
TABLE2 = {
    "pi3": {"conv": ((6.13e-3, 2.67e-2), -9.909), "relu": ((1.5e-5,), 0.488), "pool": ((1.33e-4, 3.31e-5), 1.657),
            "lrn": ((5.19e-4,), 0.589), "dropout": ((2.34e-6,), 0.0525), "fc": ((9.18e-4, 3.99e-3), 1.169),
            "loading": (4.49e-6, 842.136)},
    "edge": {"conv": ((6.03e-5, 1.24e-4), 0.189), "relu": ((5.6e-6,), 5.69e-2), "pool": ((1.63e-5, 4.07e-6), 0.211),
             "lrn": ((6.59e-5,), 7.80e-2), "dropout": ((5.23e-6,), 4.64e-3), "fc": ((1.07e-4, -1.83e-4), 0.164),
             "loading": (1.33e-6, 2.182)},
}
# our layer kinds -> the paper's line
KIND_TO_LINE = {"conv": "conv", "dwconv": "conv", "relu": "relu", "activation": "relu", "maxpool": "pool",
                "avgpool": "pool", "adaptivepool": "pool", "lrn": "lrn", "dropout": "dropout", "linear": "fc"}
# Rough speed of each Pi relative to the Pi 3B (public CPU benchmarks), for the uncalibrated guesses.
PI_SPEEDUP = {"pi3": 1.0, "pi4": 2.5, "pi5": 6.0}
ASSUMED_ERROR_P95 = 0.3   # the paper publishes no error figure; this is an assumption, not a measurement


def _kinds(machine: str, scale: float) -> dict:
    lines = TABLE2[machine]
    floor = lines["dropout"][1] * MS * scale
    kinds = {}
    for kind, line in KIND_TO_LINE.items():
        coef, intercept = lines[line]
        width = 2 if kind == "activation" else len(coef)      # activation carries (in, out) features
        coef = (list(coef) + [0.0] * width)[:width]
        model = {"type": "linear", "coef": [c * MS * scale for c in coef], "intercept": intercept * MS * scale,
                 "floor": floor, "positive": False}
        kinds[kind] = {"models": {"edgent": model}, "features": {"edgent": "edgent"}, "chosen": "edgent",
                       "cv": {}, "n": 0}
    return kinds


def edgent_profile(which: str = "pi3", scale: float = 1.0, **fields) -> Profile:
    """The paper's regressions for its Pi 3B (`which="pi3"`) or its edge PC (`"edge"`)."""
    machine = which
    lines = TABLE2[machine]
    relu_slope = lines["relu"][0][0] * MS * scale
    conv_coef, conv_b = lines["conv"]
    # MACs fallback: the conv line's seconds per MAC on a mid-sized layer (64->192 channels,
    # 5x5 kernel, 16x16 map: x1 = 16384, x2 = 4800, 78.6M MACs).
    conv_ms = conv_coef[0] * 16384 + conv_coef[1] * 4800 + conv_b
    defaults = dict(
        name=f"{machine}-edgent", target="pi3" if machine == "pi3" else "local", kinds=_kinds(machine, scale),
        fused_s_per_elem=relu_slope,
        fallback={"s_per_mac": conv_ms * MS * scale / 78_643_200, "s_per_elem": relu_slope, "intercept": 0.0},
        loading={"s_per_byte": lines["loading"][0] * MS * scale, "intercept": lines["loading"][1] * MS * scale},
        error_p95=ASSUMED_ERROR_P95, source="paper", date="2018",
        machine={"description": "Raspberry Pi 3B (Edgent paper, Chainer)" if machine == "pi3"
                 else "desktop PC, quad-core Intel 3.4 GHz, 8 GB (Edgent paper, Chainer)"},
        notes="Edgent (Li et al.) Table 2, ms converted to s; features as in its Table 1; clipped at its smallest "
              f"intercept; error_p95 {ASSUMED_ERROR_P95} is assumed (the paper gives none)")
    defaults.update(fields)
    return Profile(**defaults)


def uncalibrated_pi(name: str) -> Profile:
    """A guess for a Pi nobody has profiled yet: the paper's Pi 3B lines divided by a rough speed-up.
    Marked uncalibrated: planning with it needs allow_uncalibrated=True."""
    speedup = PI_SPEEDUP[name]
    return edgent_profile("pi3", 1.0 / speedup, name=name, target=name, calibrated=False, source="guess",
                          machine={"description": f"{name}: not measured"}, date="",
                          notes=f"UNCALIBRATED guess: Edgent's Pi 3B lines / {speedup} (rough {name} speed-up); "
                                f"run `edgecut profile --target {name}` on the device")


def shipped_profiles() -> list[Profile]:
    return [edgent_profile("pi3"), *(uncalibrated_pi(n) for n in PI_SPEEDUP)]


def main() -> None:
    for prof in shipped_profiles():
        print(prof.save(PROFILE_DIR / f"{prof.name}.json"))


if __name__ == "__main__":
    main()


__all__ = ["TABLE2", "edgent_profile", "shipped_profiles", "uncalibrated_pi"]
