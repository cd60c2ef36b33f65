"""`edgecut link --listen 127.0.0.1:9100 --to 127.0.0.1:9000 --rate 1mbit --delay 20ms`: a
userspace link emulator (token bucket + fixed delay, per direction) between a device and a server."""
from __future__ import annotations

import signal
import threading

from edgecut.errors import UsageError
from edgecut.units import format_bandwidth, parse_bandwidth, parse_size, parse_time


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    """('127.0.0.1', 9000) from '127.0.0.1:9000', '[::1]:9000' or 'localhost:9000'."""
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"cannot read {what} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9000")
    return host, int(port)


def register(sub) -> None:
    p = sub.add_parser("link", help="relay TCP through an emulated link (rate limit + delay) for trying bandwidths",
                       description="Listen on --listen and relay every connection to --to, shaping each "
                                   "direction with a token bucket (--rate, --burst) and a fixed one-way --delay. "
                                   "Point a device at --listen instead of the server.")
    p.add_argument("--listen", default="127.0.0.1:9100", metavar="HOST:PORT", help="where devices connect (port 0: any)")
    p.add_argument("--to", default="127.0.0.1:9000", metavar="HOST:PORT", help="the edge server")
    p.add_argument("--rate", default=None, help="device->edge bandwidth, e.g. 1mbit, 500kbit, 2MB/s (default: unlimited)")
    p.add_argument("--delay", default="0ms", help="one-way delay device->edge, e.g. 20ms")
    p.add_argument("--down-rate", default=None, help="edge->device bandwidth (default: --rate)")
    p.add_argument("--down-delay", default=None, help="one-way delay edge->device (default: --delay)")
    p.add_argument("--burst", default="1500", help="token bucket depth in bytes (default 1500, one packet)")
    p.set_defaults(func=run)


def run(args) -> int:
    from edgecut.runtime.linkemu import LinkEmulator

    rate = parse_bandwidth(args.rate) if args.rate else None
    down = parse_bandwidth(args.down_rate) if args.down_rate else None
    delay = parse_time(args.delay)
    down_delay = parse_time(args.down_delay) if args.down_delay else None
    if (rate is not None and rate <= 0) or (down is not None and down <= 0) or delay < 0:
        raise UsageError("--rate must be > 0 and --delay >= 0")
    link = LinkEmulator(parse_address(args.listen, "--listen"), parse_address(args.to, "--to"), rate=rate,
                        delay=delay, down_rate=down, down_delay=down_delay, burst=parse_size(args.burst))
    try:
        link.start()
    except OSError as e:
        raise UsageError(f"cannot listen on {args.listen}: {e.strerror}") from None
    host, port = link.address
    show = lambda r: format_bandwidth(r) if r else "unlimited"  # noqa: E731
    print(f"edgecut link: {host}:{port} -> {args.to}, up {show(link.up.rate)} + {link.up.delay * 1e3:g}ms, "
          f"down {show(link.down.rate)} + {link.down.delay * 1e3:g}ms", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    link.stop()
    return 0
