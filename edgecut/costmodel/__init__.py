"""Cost model: profile layers on a target, fit per-layer-kind regressors, the network model.

    prof = costmodel.load_profile("local")                  # or a path, or profile_target("local")
    gm = edgecut.passes.annotate_cost.annotate_cost(gm, prof, prof)
"""
from edgecut.costmodel.profile import FORMAT, VERSION, Profile, check_calibrated, load_profile, shipped


def profile_target(*args, **kwargs):
    """Measure a target on this machine (see `edgecut.costmodel.calibrate.profile_target`)."""
    from edgecut.costmodel.calibrate import profile_target as run
    return run(*args, **kwargs)


__all__ = ["FORMAT", "VERSION", "Profile", "check_calibrated", "load_profile", "profile_target", "shipped"]
