"""The `Target` registry: where a part of the model runs, and how TVM builds for it.

Built-in targets cover the Pis, a Jetson Nano's CPU, this machine (`local`/`x86`) and an NVIDIA
GPU edge (`cuda`). Users add their own from a JSON file (`register_file`) with the same fields.
"""
from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

from edgecut.errors import UsageError

AARCH64_CC = "aarch64-linux-gnu-gcc"


@dataclass(frozen=True)
class Target:
    """name: registry key; tvm: the TVM target as a dict (host CPU resolved at use);
    cc: cross compiler for `export_library` ("" = the host compiler); profile: name of the
    default cost profile shipped in edgecut/profiles; arch: machine arch the library runs on."""

    name: str
    tvm: dict
    cc: str = ""
    profile: str = ""
    arch: str = "x86_64"
    description: str = ""
    aliases: tuple = field(default=())

    def tvm_target(self, opt_level: int | None = None):
        """The `tvm.target.Target`, with `mcpu` of the host filled in for local targets; LLVM's
        `opt_level` (0-3) when given."""
        import tvm

        spec = dict(self.tvm)
        if opt_level is not None:
            spec["opt-level"] = int(opt_level)
        if spec.get("kind") == "llvm" and spec.get("mcpu") == "native":
            spec["mcpu"] = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName")()
        if spec.get("host", {}).get("mcpu") == "native":
            spec["host"] = dict(spec["host"], mcpu=tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName")())
        return tvm.target.Target(spec)

    @property
    def runs_here(self) -> bool:
        """True when a library built for this target can be loaded on this machine."""
        if self.tvm.get("kind") != "llvm":
            return False
        return self.arch == platform.machine()

    def to_dict(self) -> dict:
        return {"name": self.name, "tvm": self.tvm, "cc": self.cc, "profile": self.profile,
                "arch": self.arch, "description": self.description}


def _arm(name, mcpu, desc, profile, aliases=()):
    return Target(name, {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu, "num-cores": 4},
                  AARCH64_CC, profile, "aarch64", desc, tuple(aliases))


_BUILTIN = [
    _arm("pi4", "cortex-a72", "Raspberry Pi 4 (Cortex-A72, 4 cores)", "pi4", ("pi",)),
    _arm("pi3", "cortex-a53", "Raspberry Pi 3B (Cortex-A53, 4 cores)", "pi3"),
    _arm("pi5", "cortex-a76", "Raspberry Pi 5 (Cortex-A76, 4 cores)", "pi5"),
    _arm("jetson-nano", "cortex-a57", "Jetson Nano CPU (Cortex-A57, 4 cores)", ""),
    Target("local", {"kind": "llvm", "mcpu": "native"}, "", "local", platform.machine(),
           "this machine's CPU", ("x86",)),
    Target("cuda", {"kind": "cuda", "host": {"kind": "llvm", "mcpu": "native"}}, "", "", platform.machine(),
           "an NVIDIA GPU on the edge server"),
]

_REGISTRY: dict[str, Target] = {}


def register(target: Target) -> Target:
    for key in (target.name, *target.aliases):
        _REGISTRY[key] = target
    return target


for _t in _BUILTIN:
    register(_t)


def register_file(path: str | Path) -> list[Target]:
    """Add targets from a JSON file: one object or a list, with the fields of `Target`."""
    data = json.loads(Path(path).read_text())
    items = data if isinstance(data, list) else [data]
    out = []
    for d in items:
        missing = {"name", "tvm"} - set(d)
        if missing:
            raise UsageError(f"target file {path}: entry {d!r} lacks {sorted(missing)}")
        d = dict(d)
        d["aliases"] = tuple(d.get("aliases", ()))
        out.append(register(Target(**d)))
    return out


def known() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str | Target) -> Target:
    """Look a target up by name or alias; the error lists the known ones."""
    if isinstance(name, Target):
        return name
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown target {name!r}; known targets: {', '.join(known())} "
                         "(add your own with edgecut.targets.register_file)") from None
