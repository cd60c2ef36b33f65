"""`edgecut profile --target local -o profiles/local.json [--quick]`: measure this machine's
per-layer latencies with the deployed TVM pipeline and fit its cost Profile.
`edgecut profile --show NAME|PATH` prints a profile's summary."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "profile", help="time layers on this machine and fit its latency cost profile",
        description="Time a grid of layers of every kind (compiled with edgecut's TVM build, warm-up, medians), "
                    "fit per-layer-kind regressors, check them on held-out programs, measure model loading and "
                    "the runtime's per-message overhead, and write a versioned JSON profile. Run it on the "
                    "device to profile the device (e.g. on a Raspberry Pi: --target pi4), or from here with --rpc: "
                    "each program is cross-compiled here and timed on the device, which runs only the TVM runtime "
                    "and an RPC server (python scripts/rpc_server.py --host 0.0.0.0 --port 9090, from an edgecut checkout; or "
                    "TVM's python -m tvm.exec.rpc_server, which also needs cloudpickle).")
    p.add_argument("--target", default="local", help="target of the machine to profile: this one, or the device at --rpc (default: local)")
    p.add_argument("-o", "--output", metavar="PATH", help="where to write the profile (default: <target>.json)")
    p.add_argument("--rpc", metavar="HOST:PORT", help="time on the device running a TVM RPC server at HOST:PORT "
                   "(for the emulated Pi here: scripts/aarch64-env.sh rpc-server 9090, then --rpc 127.0.0.1:9090)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a small grid (under 2 minutes) instead of the default")
    size.add_argument("--tiny", action="store_true", help="three layers: checks the path in seconds (not for planning)")
    p.add_argument("--name", help="profile name stored in the file (default: the target name)")
    p.add_argument("--seed", type=int, default=0, help="seed of the layer grid")
    p.add_argument("--show", metavar="PROFILE", help="print the summary of a profile (a shipped name or a path) and exit")
    p.set_defaults(func=run)


def summary(prof) -> str:
    m = prof.machine
    where = (f"{m.get('machine', '?')} over TVM RPC at {m.get('rpc', '?')}"
             f"{', ' + m['note'] if m.get('note') else ''}" if m.get("measured") == "over TVM RPC" else "")
    lines = [f"profile {prof.name!r} for target {prof.target!r} ({prof.source}"
             f"{', UNCALIBRATED' if not prof.calibrated else ''}), measured {prof.date or '?'} "
             f"with edgecut {prof.edgecut_version or '?'}", f"  measured on {where}" if where else "",
             f"  error_p95 {prof.error_p95:.1%} (held-out programs and models), per-layer median error "
             f"{prof.layer_mdape:.1%}", f"  {prof.notes}" if prof.notes else ""]
    for r in prof.held_out.get("models", []):
        lines.append(f"  held out {r['name']}@{r['side']}: measured {r['measured'] * 1e3:.2f} ms, predicted "
                     f"{r['predicted'] * 1e3:.2f} ms ({r['error']:.1%})")
    lines.append(f"  {'kind':<13}{'n':>4}  {'chosen':<10} CV weighted error: edgent / elems / work / loglinear / gbt")
    for kind, d in sorted(prof.kinds.items()):
        cv = " / ".join(f"{d['cv'][m]['wape']:.1%}" if m in d["cv"] else "-"
                        for m in ("edgent", "elems", "work", "loglinear", "gbt"))
        lines.append(f"  {kind:<13}{d['n']:>4}  {d['chosen']:<10} {cv}")
    lines.append(f"  fused elementwise: {prof.fused_s_per_elem * 1e9:.3f} ns/element; loading: "
                 f"{prof.loading['intercept'] * 1e3:.2f} ms + {prof.loading['s_per_byte'] * 1e9:.3f} ns/byte; "
                 f"message overhead {prof.message_overhead_s * 1e6:.0f} us; segment call "
                 f"{prof.segment_seconds(0, 0) * 1e6:.0f} us + boundary")
    return "\n".join(ln for ln in lines if ln)


def run(args) -> int:
    from edgecut import costmodel

    if args.show:
        print(summary(costmodel.load_profile(args.show)))
        return 0
    prof = costmodel.profile_target(args.target, quick=args.quick, name=args.name, seed=args.seed, rpc=args.rpc,
                                    tiny=args.tiny)
    path = prof.save(args.output or f"{prof.target}.json")
    print(summary(prof))
    print(f"wrote {path}")
    return 0
