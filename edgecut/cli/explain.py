"""`edgecut explain ARTIFACT -o plan.png [--bandwidth 2mbit]`."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("explain", help="draw an artifact's per-layer costs, its cut and exit, and its plan table",
                       description="Render the Neurosurgeon/Edgent figure of an artifact: per-layer device and "
                                   "edge latency and output size with the chosen cut and exit marked, and the "
                                   "plan table against bandwidth.")
    p.add_argument("artifact", help="artifact directory (from edgecut compile)")
    p.add_argument("-o", "--output", default="plan.png", help="image to write (default plan.png)")
    p.add_argument("--bandwidth", help="mark the plan at this bandwidth, e.g. 2mbit")
    p.set_defaults(func=run)


def run(args) -> int:
    from edgecut.api import Artifact

    art = Artifact.open(args.artifact)
    print(art.report())
    print(f"explain: {art.explain(args.output, args.bandwidth)}")
    return 0
