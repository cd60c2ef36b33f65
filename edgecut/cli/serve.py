"""`edgecut serve ARTIFACT --host 127.0.0.1 --port 9000 [--token-file F] [--insecure]`: the edge server."""
from __future__ import annotations

import logging

from edgecut.cli.run import add_calibration_args, calibration_spec
from edgecut.units import parse_size, parse_time


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the edge part of an artifact to devices over TCP",
                       description="Run the edge side of ARTIFACT for many devices at once (msgpack frames over "
                                   "TCP). Binding an address that is not loopback needs --token-file (or "
                                   "--insecure). SIGTERM finishes the requests in flight, then exits.")
    p.add_argument("artifact", help="artifact directory (with manifest.msgpack)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9000, help="TCP port (default 9000; 0: any free port)")
    p.add_argument("--token-file", metavar="F", help="file with a shared secret devices must prove they know (HMAC)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback address without a token")
    p.add_argument("--backend", choices=("tvm", "onnxruntime"), default="tvm", help="how to run the edge part")
    p.add_argument("--workers", type=int, default=2, help="requests computed at once (default 2)")
    p.add_argument("--queue", type=int, default=64, help="requests that may wait beyond the workers (default 64)")
    p.add_argument("--max-frame", default="64MiB", help="largest frame accepted (default 64MiB)")
    p.add_argument("--timeout", default="30s", help="longest a request may take (default 30s; devices may ask less)")
    p.add_argument("--quiet", action="store_true", help="log warnings only (no line per connection)")
    add_calibration_args(p, "edge")
    p.set_defaults(func=run)


def run(args) -> int:
    from edgecut.runtime.protocol import read_token
    from edgecut.runtime.server import EdgeServer

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    server = EdgeServer(args.artifact, args.host, args.port, token=read_token(args.token_file),
                        insecure=args.insecure, backend=args.backend, workers=args.workers, max_queue=args.queue,
                        max_frame=parse_size(args.max_frame), request_timeout=parse_time(args.timeout),
                        calibrate=calibration_spec(args), quantile=args.quantile)
    try:
        server.start()
    except OSError as e:
        from edgecut.errors import UsageError

        raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    host, port = server.address
    print(f"edgecut serve: {server.model} on {host}:{port}", flush=True)
    server.serve_forever()
    return 0
