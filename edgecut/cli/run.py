"""`edgecut run ARTIFACT --edge HOST:PORT --input x.npy`: answer a request as a device would."""
from __future__ import annotations

import json
import logging

import numpy as np

from edgecut.errors import UsageError
from edgecut.units import parse_bandwidth, parse_time


def add_calibration_args(p, side: str) -> None:
    """--calibration FILE, --no-calibrate and --quantile, for `run` (device) and `serve` (edge)."""
    p.add_argument("--calibration", metavar="FILE",
                   help=f"the {side} calibration to plan with (default: calibration-{side}.json beside the artifact, "
                        "made at the first start when missing or older than the artifact)")
    p.add_argument("--no-calibrate", action="store_true",
                   help=f"do not time the {side} parts: plan with the artifact's predictions")
    p.add_argument("--quantile", type=float, default=0.99,
                   help="quantile of the measured times to plan with (default 0.99)")


def calibration_spec(args):
    return False if args.no_calibrate else (args.calibration or True)


def register(sub) -> None:
    p = sub.add_parser("run", help="run an input through an artifact as a device, with or without an edge server",
                       description="Run the device side of ARTIFACT on --input, send the crossing tensors to the "
                                   "edge server at --edge, and print the answer, the plan used and the time split. "
                                   "Without --edge, or when the edge fails, the device answers from a local exit.")
    p.add_argument("artifact", help="artifact directory (with manifest.msgpack)")
    p.add_argument("--edge", metavar="HOST:PORT", help="edge server (edgecut serve); omit to run locally only")
    p.add_argument("--input", action="append", required=True, metavar="[NAME=]FILE.npy",
                   help="model input as a .npy file; repeat as NAME=FILE for several inputs")
    p.add_argument("--deadline", help="per-request deadline, e.g. 100ms (default: the plan table's)")
    p.add_argument("--bandwidth", help="assume this bandwidth for the first request instead of probing, e.g. 8mbit")
    p.add_argument("--token-file", metavar="F", help="the server's shared secret")
    p.add_argument("--no-early-exit", action="store_true", help="never stop at an early exit")
    p.add_argument("--backend", choices=("tvm", "onnxruntime"), default="tvm", help="how to run the device part")
    p.add_argument("--repeat", type=int, default=1, help="answer the input this many times (plans may change)")
    p.add_argument("--timeout", default="10s", help="longest wait for the edge without a deadline (default 10s)")
    p.add_argument("--output", metavar="FILE.npy", help="save the last answer's logits here")
    add_calibration_args(p, "device")
    p.add_argument("--json", action="store_true", help="print one JSON object per answer")
    p.set_defaults(func=run)


def _inputs(specs, names) -> dict:
    out = {}
    for i, spec in enumerate(specs):
        name, sep, path = spec.rpartition("=")
        if not sep:
            if i >= len(names):
                raise UsageError(f"more --input files than model inputs ({', '.join(names)}); use NAME=FILE.npy")
            name = names[i]
        try:
            out[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read --input {path!r} as a .npy array: {e}") from None
    return out


def run(args) -> int:
    from edgecut.cli.link import parse_address
    from edgecut.runtime.client import DeviceRuntime
    from edgecut.runtime.protocol import read_token

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    edge = parse_address(args.edge, "--edge") if args.edge else None
    rt = DeviceRuntime(args.artifact, edge=edge, token=read_token(args.token_file), backend=args.backend,
                       early_exit=not args.no_early_exit, request_timeout=parse_time(args.timeout),
                       probe_interval=None, calibrate=calibration_spec(args), quantile=args.quantile,
                       initial_bandwidth=parse_bandwidth(args.bandwidth) if args.bandwidth else None)
    deadline = parse_time(args.deadline) if args.deadline else None
    with rt:
        inputs = _inputs(args.input, list(rt.part.input_names))
        for _ in range(max(1, args.repeat)):
            r = rt.infer(inputs, deadline=deadline)
            top = int(np.argmax(r.logits.reshape(r.logits.shape[0], -1)[0]))
            if args.json:
                print(json.dumps({"plan": r.plan_id, "exit": r.exit_id, "where": r.where, "reason": r.reason,
                                  "top": top, "logits": r.logits.tolist(), "device_s": r.device_s,
                                  "transfer_s": r.transfer_s, "edge_s": r.edge_s, "total_s": r.total_s,
                                  "predicted_s": r.predicted_s if r.predicted_s == r.predicted_s else None,
                                  "bandwidth": r.bandwidth}))
            else:
                print(f"class {top}  plan {r.plan_id}  exit {r.exit_id}  on {r.where}  "
                      f"device {r.device_s * 1e3:.2f}ms  transfer {r.transfer_s * 1e3:.2f}ms  "
                      f"edge {r.edge_s * 1e3:.2f}ms  total {r.total_s * 1e3:.2f}ms  "
                      f"(planned {r.predicted_s * 1e3:.2f}ms; {r.reason})")
        if args.output:
            np.save(args.output, r.logits)
    return 0
