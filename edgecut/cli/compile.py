"""`edgecut compile MODEL --input SHAPE --target pi4 --edge local --deadline 100ms -o build/NAME`."""
from __future__ import annotations

import argparse


class ListTargets(argparse.Action):
    """`--list-targets`: print the registered targets and exit (before the required options are checked)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from edgecut import targets

        for name in targets.known():
            t = targets.get(name)
            alias = f" (alias of {t.name})" if name != t.name else ""
            print(f"{name:<12} {t.arch:<8} profile {t.profile or '-':<6} {t.description}{alias}")
        parser.exit()


def register(sub) -> None:
    p = sub.add_parser("compile", help="compile a model into a device/edge artifact that meets a deadline",
                       description="Trace MODEL, insert and train exits (with --data), predict per-layer cost, "
                                   "solve the plan table and generate TVM/ONNX code for both sides.")
    p.add_argument("model", help="edgecut.zoo:NAME or path/to/file.py:Factory")
    p.add_argument("--input", metavar="SHAPE", help="input shape, e.g. 1x3x32x32 (zoo models have a default)")
    p.add_argument("--target", default="pi4", help="device target (default pi4; see --list-targets)")
    p.add_argument("--list-targets", action=ListTargets, help="print the known targets and exit")
    p.add_argument("--edge", default="local", help="edge target (default local)")
    p.add_argument("--deadline", default="100ms", help="latency deadline, e.g. 100ms (default)")
    p.add_argument("--bandwidth", help="expected bandwidth, e.g. 2mbit: the plan to report")
    p.add_argument("--rtt", default="0ms", help="the link's round-trip time, e.g. 20ms")
    p.add_argument("--data", help="train exits on this data set ('digits'); without it, no exits")
    p.add_argument("--exits", type=int, default=5, help="number of exits with --data, final included (default 5)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs for the exits (default 15)")
    p.add_argument("--objective", choices=("accuracy", "latency"), default="accuracy",
                   help="accuracy: best accuracy within the deadline (Edgent); latency: fastest (Neurosurgeon)")
    p.add_argument("--margin", default="0", help="relative prediction error to plan for, or p95 (default 0)")
    p.add_argument("--profile", help="device cost profile (name or file; default: the target's)")
    p.add_argument("--edge-profile", help="edge cost profile (name or file; default: the edge target's)")
    p.add_argument("--allow-uncalibrated", action="store_true", help="plan with an uncalibrated profile's guesses")
    p.add_argument("--codecs", default="fp32", help="how crossing tensors may travel, comma-separated, e.g. "
                   "fp32,fp16,int8+zstd (needs --data; default fp32)")
    p.add_argument("--backend", choices=("tvm", "onnxruntime"), default="tvm", help="code generator (default tvm)")
    p.add_argument("--edge-batches", default="", metavar="N,N",
                   help="also compile the edge segments for these batch sizes, e.g. 4,8 (for `edgecut serve --ray` batching)")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.add_argument("--explain", metavar="PNG", help="also render the explain figure to PNG")
    p.set_defaults(func=run)


def run(args) -> int:
    import edgecut
    from edgecut.cli._common import load_model_and_input
    from edgecut.errors import UsageError

    model, name, x = load_model_and_input(args.model, args.input)
    margin = args.margin if args.margin == "p95" else float(args.margin)
    try:
        batches = tuple(int(b) for b in args.edge_batches.split(",") if b.strip())
    except ValueError:
        raise UsageError(f"--edge-batches {args.edge_batches!r}: give batch sizes like 4,8") from None
    if any(b < 1 for b in batches):
        raise UsageError(f"--edge-batches {args.edge_batches!r}: batch sizes must be >= 1")
    art = edgecut.compile(model, x, target=args.target, edge=args.edge, deadline=args.deadline,
                          bandwidth=args.bandwidth, exits="auto" if args.data else None, data=args.data,
                          profile=args.profile, edge_profile=args.edge_profile, objective=args.objective,
                          rtt=args.rtt, margin=margin, epochs=args.epochs, num_exits=args.exits,
                          allow_uncalibrated=args.allow_uncalibrated, out_dir=args.output, backend=args.backend,
                          name=name, codecs=tuple(c for c in args.codecs.split(",") if c), edge_batches=batches)
    print(art.report())
    if args.explain:
        print(f"explain: {art.explain(args.explain)}")
    print(f"artifact: {art.path}")
    return 0
