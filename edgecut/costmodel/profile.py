"""`Profile`: the fitted latency model of one machine, saved as versioned JSON (never pickle).

A profile holds, per layer kind, the candidate regressors and the one cross-validation chose
(`kinds`), the marginal cost of an elementwise op fused into its producer (`fused_s_per_elem`),
a MACs-based fallback for kinds it has no regressor for, the model-loading line, the runtime's
measured per-message overhead, and how wrong it is: `error_p95`, the 95th percentile of the
relative error of predicted against measured latency of compiled programs held out of fitting
(the solver's safety margin), and `layer_mdape`, the per-layer median error.

A measured profile also keeps its training `samples` (each tagged with its `source`: the layer
grid or the zoo model whose kernel it is) and the whole `models` timed while profiling, so it can
be refitted without a model's own kernels (`calibrate.refit`) to predict that model honestly;
`held_out` records those leave-one-model-out errors.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgecut.errors import ProfileError
from edgecut.costmodel import regressors

FORMAT = "edgecut-profile"
VERSION = 1
PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"


@dataclass(frozen=True)
class Profile:
    name: str
    target: str                           # Target name this profile describes
    kinds: dict = field(default_factory=dict, hash=False)  # kind -> fit_kind() dict
    fused_s_per_elem: float = 0.0         # seconds per output element of a fused elementwise op
    fallback: dict = field(default_factory=lambda: {"s_per_mac": 1e-9, "s_per_elem": 1e-9, "intercept": 0.0},
                           hash=False)    # MACs-based estimate for kinds without a regressor
    loading: dict = field(default_factory=lambda: {"s_per_byte": 0.0, "intercept": 0.0}, hash=False)
    message_overhead_s: float = 0.0       # runtime's fixed cost per msgpack frame round trip
    error_p95: float = 0.0                # relative error quantile on held-out programs
    layer_mdape: float = float("nan")     # per-layer median abs. percentage error (cross-validation)
    calibrated: bool = True               # False: refuse to plan unless allow_uncalibrated
    source: str = "measured"              # "measured", "paper", "guess"
    machine: dict = field(default_factory=dict, hash=False)
    date: str = ""
    edgecut_version: str = ""
    notes: str = ""
    scale: float = 1.0                    # every layer prediction is multiplied by this (see `scaled`)
    segment: dict = field(default_factory=lambda: {"intercept": 0.0, "s_per_elem": 0.0},
                          hash=False)     # cost of one compiled segment call (see `segment_seconds`)
    samples: list = field(default_factory=list, hash=False, repr=False)  # the measured training data
    models: list = field(default_factory=list, hash=False)  # whole zoo models timed while profiling
    held_out: dict = field(default_factory=dict, hash=False)  # leave-one-model-out errors
    _models: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        built = {kind: regressors.from_dict(d["models"][d["chosen"]]) for kind, d in self.kinds.items()}
        object.__setattr__(self, "_models", built)

    # --- prediction ---------------------------------------------------------------------------
    def has(self, kind: str) -> bool:
        return kind in self.kinds

    def method(self, kind: str) -> str:
        return self.kinds[kind]["chosen"]

    def predict(self, kind: str, edgent: tuple, work: dict, method: str | None = None) -> float:
        """Seconds for one layer of `kind`, from its Edgent features and work features. A kind with
        no regressor falls back to the MACs-based estimate, with a warning."""
        if kind not in self.kinds:
            warnings.warn(f"profile {self.name!r} has no regressor for layer kind {kind!r}; "
                          "using its MACs-based estimate", stacklevel=2)
            return self.fallback_seconds(work)
        d = self.kinds[kind]
        name = method or d["chosen"]
        est = self._models[kind] if name == d["chosen"] else regressors.from_dict(d["models"][name])
        if d["features"][name] == "edgent":
            x = list(edgent) + [0.0] * (est.n_features_in_ - len(edgent))
            x = x[: est.n_features_in_]
        else:
            from edgecut.costmodel.features import SHAPE, WORK
            if d["features"][name] == "elems":
                x = [work["macs"] + work["in_elems"] + work["out_elems"]]
            else:
                x = [work[k] for k in (SHAPE if d["features"][name] == "shape" else WORK)]
        return self.scale * float(est.predict(np.asarray([x], dtype=float))[0])

    def fallback_seconds(self, work: dict) -> float:
        f = self.fallback
        return self.scale * max(0.0, f["intercept"] + f["s_per_mac"] * work["macs"]
                   + f["s_per_elem"] * (work["in_elems"] + work["out_elems"]))

    def scaled(self, factor: float) -> "Profile":
        """This profile for a machine `factor` times slower (layer costs scale; the network's
        per-message overhead does not). Used to plan for an emulated slow device."""
        from dataclasses import replace

        if not factor > 0:
            raise ValueError(f"scale factor must be > 0, got {factor}")
        return replace(self, name=f"{self.name}x{factor:g}", scale=self.scale * factor)

    def segment_seconds(self, in_elems: int = 0, out_elems: int = 0) -> float:
        """Seconds one compiled segment call costs beyond its layers: the VM call from Python,
        numpy <-> TVM tensor copies and the NCHW <-> NHWC transforms at its boundary, for
        `in_elems` input and `out_elems` output elements. A plan run as k segments pays it k times
        (`edgecut.codegen.load.Part.run` calls each segment separately)."""
        s, e = self.segment, in_elems + out_elems
        pts = s.get("points")
        if pts:   # measured points, interpolated; past the last one, the fitted slope
            xs, ys = zip(*pts)
            t = float(np.interp(e, xs, ys)) + s["s_per_elem"] * max(0.0, e - xs[-1])
        else:
            t = s["intercept"] + s["s_per_elem"] * e
        return self.scale * max(0.0, t)

    def loading_seconds(self, model_bytes: int) -> float:
        """Edgent's model-loading regression: seconds to load a library of `model_bytes`."""
        return max(0.0, self.loading["intercept"] + self.loading["s_per_byte"] * model_bytes)

    def link(self, bandwidth: float, rtt: float = 0.0):
        """A `Link` with this profile's measured per-message overhead."""
        from edgecut.types import Link
        return Link(bandwidth, rtt, self.message_overhead_s)

    # --- files --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        return {"format": FORMAT, "version": VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict, where: str = "<dict>") -> "Profile":
        if d.get("format") != FORMAT:
            raise ProfileError(f"{where} is not an edgecut profile (format {d.get('format')!r}, "
                               f"expected {FORMAT!r}); make one with `edgecut profile`")
        if d.get("version") != VERSION:
            raise ProfileError(f"{where} is profile format version {d.get('version')!r}, this edgecut reads "
                               f"version {VERSION}; re-measure it with `edgecut profile` of this version")
        fields = {k: v for k, v in d.items() if k not in ("format", "version")}
        try:
            return cls(**fields)
        except (TypeError, KeyError, ValueError) as e:
            raise ProfileError(f"{where}: malformed profile ({e}); re-measure it with `edgecut profile`") from e

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ProfileError(f"profile file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ProfileError(f"profile file {path} is not JSON ({e})") from None
        return cls.from_dict(d, str(path))


def shipped() -> list[str]:
    """Names of the profiles that ship with edgecut."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_path, target=None) -> Profile:
    """A `Profile` from a shipped name ("local", "pi3-edgent", ...), a path, or a Profile.
    With `target` (a name or `Target`), refuse a profile measured for another target."""
    if isinstance(name_or_path, Profile):
        prof = name_or_path
    else:
        text = str(name_or_path)
        path = Path(text)
        if not (path.suffix == ".json" or path.exists()):
            path = PROFILE_DIR / f"{text}.json"
            if not path.exists():
                raise ProfileError(f"no profile named {text!r}; shipped profiles: {', '.join(shipped())}; "
                                   "or pass the path of a file made by `edgecut profile`")
        prof = Profile.load(path)
    if target is not None:
        from edgecut import targets
        t = targets.get(target)
        if prof.target not in (t.name, *t.aliases):
            raise ProfileError(f"profile {prof.name!r} describes target {prof.target!r}, not {t.name!r}; "
                               f"profile the device with `edgecut profile --target {t.name}`")
    return prof


def check_calibrated(prof: Profile, allow_uncalibrated: bool, role: str = "device") -> None:
    if not prof.calibrated and not allow_uncalibrated:
        raise ProfileError(
            f"the {role} profile {prof.name!r} is uncalibrated ({prof.notes or prof.source}); its predictions "
            f"are guesses. Profile the {role} with `edgecut profile --target {prof.target} -o {prof.target}.json` "
            "run on that machine, or pass allow_uncalibrated=True to plan with the guesses anyway")
