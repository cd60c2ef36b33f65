"""Run Python code for aarch64 (a Pi) on this machine: qemu-aarch64 user mode, an arm64 sysroot
and the aarch64 TVM runtime, set up and cached by `scripts/aarch64-env.sh` (~/.cache/edgecut).

`run_aarch64(script, *args, pythonpath=[...])` runs `script` with the emulated arm64 python3.11;
the edgecut checkout is on its path, torch is not (there is none for it to find).
Emulated timings say nothing about a Pi's speed: use this for correctness only.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from edgecut.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "aarch64-env.sh"


def available() -> str:
    """'' when the aarch64 environment can be set up here, else why not."""
    if not SCRIPT.is_file():
        return f"{SCRIPT} not found (run from an edgecut checkout)"
    for tool in ("qemu-aarch64-static", "apt-get", "dpkg-deb"):
        if not shutil.which(tool):
            return f"{tool} is not installed (apt-get install qemu-user-static)"
    return ""


def setup(timeout: float = 900) -> None:
    """Build (once) the cached arm64 sysroot and aarch64 wheels."""
    why = available()
    if why:
        raise UsageError(f"cannot run aarch64 code here: {why}")
    proc = subprocess.run([str(SCRIPT), "setup"], capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise UsageError(f"setting up the aarch64 environment failed:\n{proc.stderr[-2000:]}")


def run_aarch64(script: str | Path, *args: str, pythonpath=(), timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `script` with the arm64 python under qemu; the edgecut checkout is importable."""
    setup()
    env = dict(os.environ, EDGECUT_AARCH64_PYTHONPATH=os.pathsep.join([str(ROOT), *map(str, pythonpath)]))
    return subprocess.run([str(SCRIPT), "run", str(script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)
