"""A single-process TVM RPC server: `python rpc_server.py [--host 127.0.0.1] [--port 9090]`.

What `edgecut profile --rpc HOST:PORT` talks to: run it on the device (copy this file there), or
on the emulated Pi here (scripts/aarch64-env.sh rpc-server). It needs only the TVM runtime (no
torch, no TVM compiler library). Unlike `python -m tvm.exec.rpc_server`, it starts no helper
process (that one spawns `sys.executable`, which fails with "Exec format error" under qemu user
mode without binfmt, and whose workers import cloudpickle, which a runtime-only install lacks)
and serves one session at a time in its own process.
It prints `rpc server listening on HOST:PORT` once it accepts connections (with --port 0, PORT is
the one the system chose). Like TVM's, it loads and runs whatever library a client uploads, with no
authentication: listen on loopback (the default) or a network you trust.
"""
import argparse
import json
import os
import platform
import socket
import struct
import sys

import tvm
import tvm_ffi
from tvm.rpc import base
from tvm.rpc import server as tvm_server
from tvm.support import utils


def handshake(conn: socket.socket, key: str) -> bool:
    """The server side of TVM's RPC handshake (as tvm.rpc.server does without a tracker);
    False for anything else (e.g. a client that only checks the port is open)."""
    try:
        return _handshake(conn, key)
    except OSError:
        return False


def _handshake(conn: socket.socket, key: str) -> bool:
    magic = struct.unpack("<i", base.recvall(conn, 4))[0]
    if magic != base.RPC_MAGIC:
        return False
    keylen = struct.unpack("<i", base.recvall(conn, 4))[0]
    client = base.recvall(conn, keylen).decode("utf-8").split()
    if not client or client[0] != "client:" + key:
        conn.sendall(struct.pack("<i", base.RPC_CODE_MISMATCH))
        return False
    reply = ("server:" + key).encode("utf-8")
    conn.sendall(struct.pack("<ii", base.RPC_CODE_SUCCESS, len(reply)) + reply)
    return True


def machine() -> str:
    """What `edgecut profile --rpc` asks the device (JSON): arch, platform, CPU, TVM, and a note
    (EDGECUT_RPC_SERVER_NOTE, e.g. that the device is emulated)."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith(("model name", "Model"))), "")
    except OSError:
        pass
    return json.dumps({"machine": platform.machine(), "platform": platform.platform(), "cpu": cpu,
                       "cpus": os.cpu_count(), "tvm": tvm.__version__,
                       "tvm_num_threads": os.environ.get("TVM_NUM_THREADS", ""),
                       "note": os.environ.get("EDGECUT_RPC_SERVER_NOTE", "")})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=9090, help="port (0: any free port)")
    p.add_argument("--key", default="", help="the key clients must present")
    p.add_argument("--sessions", type=int, default=0, help="exit after this many sessions (0: never)")
    args = p.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(1)
    host, port = sock.getsockname()[:2]
    tvm_ffi.register_global_func("edgecut.rpc.machine", machine, override=True)
    print(f"rpc server listening on {host}:{port}", flush=True)
    served = 0
    while not args.sessions or served < args.sessions:
        conn, addr = sock.accept()
        try:
            if not handshake(conn, args.key):
                continue
            work = utils.tempdir()
            tvm_server._server_env(None, work)     # registers upload/load_module in this process
            print(f"session from {addr[0]}:{addr[1]} in {work.path}", flush=True)
            tvm_server._ffi_api.ServerLoop(conn.detach())   # the loop closes the socket
            work.remove()
            served += 1
            print(f"session from {addr[0]}:{addr[1]} ended", flush=True)
        except (OSError, RuntimeError) as e:
            print(f"session from {addr[0]}:{addr[1]} failed: {e}", file=sys.stderr, flush=True)
        finally:
            if conn.fileno() >= 0:
                conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
