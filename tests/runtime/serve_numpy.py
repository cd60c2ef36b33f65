"""Run an EdgeServer over the numpy part in its own process (for kill and SIGTERM tests).
Prints "PORT <n>" once listening; serves until SIGTERM, then drains and exits 0."""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from numpy_part import NumpyPart  # noqa: E402

from edgecut.runtime.server import EdgeServer  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--delay", type=float, default=0.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    server = EdgeServer(NumpyPart("edge", edge_delay=args.delay), "127.0.0.1", 0).start()
    print("PORT", server.address[1], flush=True)
    server.serve_forever(drain_timeout=10)
