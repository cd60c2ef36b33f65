"""`edgecut serve ARTIFACT [ARTIFACT ...] [--ray [ADDRESS]] --host 127.0.0.1 --port 9000 [--token-file F]`:
the edge server (in this process), or the front of an edge tier on a Ray cluster (`--ray`)."""
from __future__ import annotations

import logging

from edgecut.cli.run import add_calibration_args, calibration_spec
from edgecut.errors import UsageError
from edgecut.units import parse_size, parse_time


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the edge part of one or more artifacts to devices over TCP",
                       description="Run the edge side of each ARTIFACT for many devices at once (msgpack frames "
                                   "over TCP); a device's hello names its model. Binding an address that is not "
                                   "loopback needs --token-file (or --insecure). SIGTERM finishes the requests in "
                                   "flight, then exits. With --ray the edge parts run as Ray Serve replicas.")
    p.add_argument("artifact", nargs="+", help="artifact directory (with manifest.msgpack); one per model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9000, help="TCP port (default 9000; 0: any free port)")
    p.add_argument("--token-file", metavar="F", help="file with a shared secret devices must prove they know (HMAC)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback address without a token")
    p.add_argument("--backend", choices=("tvm", "onnxruntime"), default="tvm", help="how to run the edge part")
    p.add_argument("--workers", type=int, default=2, help="requests computed at once, without --ray (default 2)")
    p.add_argument("--queue", type=int, default=64,
                   help="requests that may wait beyond the workers (default 64; with --ray: in flight per model)")
    p.add_argument("--max-frame", default="64MiB", help="largest frame accepted (default 64MiB)")
    p.add_argument("--timeout", default="30s", help="longest a request may take (default 30s; devices may ask less)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics on 127.0.0.1:PORT/metrics (needs prometheus-client)")
    p.add_argument("--quiet", action="store_true", help="log warnings only (no line per connection)")
    add_calibration_args(p, "edge")
    t = p.add_argument_group("edge tier (--ray)")
    t.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run the edge parts on the Ray cluster at ADDRESS ('auto': the one `ray start` made on "
                        "this machine; no ADDRESS: start a local one)")
    t.add_argument("--replicas", default="1:2", metavar="MIN:MAX", help="replicas per model (default 1:2)")
    t.add_argument("--model-replicas", action="append", default=[], metavar="MODEL=MIN:MAX",
                   help="replica bounds of one model (repeatable)")
    t.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs each replica reserves (default 1)")
    t.add_argument("--max-batch", type=int, default=8, help="requests per replica call at most (default 8; 1: off)")
    t.add_argument("--batch-wait", default="2ms", help="longest a request waits for its batch (default 2ms)")
    t.add_argument("--no-data-port", action="store_true",
                   help="call replicas only through Ray, never over their own data port (which carries a lone "
                        "request always, and batches when a model's replica count is fixed)")
    p.set_defaults(func=run)


def parse_bounds(text: str, what: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        bounds = (int(lo), int(hi or lo))
    except ValueError:
        bounds = (0, -1)
    if not (1 <= bounds[0] <= bounds[1]):
        raise UsageError(f"{what} {text!r}: expected MIN:MAX with 1 <= MIN <= MAX, e.g. 1:4")
    return bounds


def tier_executor(args):
    """A function (part, artifact) -> RayExecutor with the command line's bounds, or None."""
    if not args.ray:
        return None
    from edgecut.runtime.protocol import manifest_identity
    from edgecut.runtime.tier import RayExecutor, start_ray

    default = parse_bounds(args.replicas, "--replicas")
    per_model = {}
    for spec in args.model_replicas:
        model, eq, bounds = spec.partition("=")
        if not eq:
            raise UsageError(f"--model-replicas {spec!r}: expected MODEL=MIN:MAX")
        per_model[model] = parse_bounds(bounds, f"--model-replicas {model}")
    start_ray(None if args.ray == "local" else args.ray)

    def make(part, artifact):
        lo, hi = per_model.get(manifest_identity(part)[0], default)
        return RayExecutor(part, artifact, min_replicas=lo, max_replicas=hi, max_batch=args.max_batch,
                           batch_wait_s=parse_time(args.batch_wait), max_queue=args.queue,
                           backend=args.backend, replica_cpus=args.replica_cpus, data_port=not args.no_data_port)
    return make


def run(args) -> int:
    from edgecut.runtime.protocol import read_token
    from edgecut.runtime.server import EdgeServer

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    if args.calibration and len(args.artifact) > 1:
        raise UsageError("--calibration FILE names one artifact's calibration; with several artifacts, leave "
                         "it out (each uses the calibration beside it)")
    metrics = None
    if args.metrics_port is not None:
        from edgecut.runtime.metrics import Metrics
        metrics = Metrics()
    server = EdgeServer(args.artifact, args.host, args.port, token=read_token(args.token_file),
                        insecure=args.insecure, backend=args.backend, workers=args.workers, max_queue=args.queue,
                        max_frame=parse_size(args.max_frame), request_timeout=parse_time(args.timeout),
                        calibrate=calibration_spec(args), quantile=args.quantile, executor=tier_executor(args),
                        metrics=metrics)
    try:
        server.start()
        if metrics:
            metrics.serve(args.metrics_port)
    except OSError as e:
        server.shutdown(0)
        raise UsageError(f"cannot listen on {args.host}:{args.port} (or metrics port {args.metrics_port}): "
                         f"{e.strerror}") from None
    host, port = server.address
    for model in server.models:
        print(f"edgecut serve: {model} on {host}:{port}", flush=True)
    server.serve_forever()
    if metrics:
        metrics.close()
    return 0
