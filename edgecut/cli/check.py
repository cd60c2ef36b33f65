"""`edgecut check ARTIFACT`: verify an artifact's files and, where its code runs here, its numbers.

Torch-free: imports only edgecut.codegen.{manifest,load} (numpy, msgpack, the TVM runtime).
"""
from __future__ import annotations

import platform
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("check", help="verify an artifact's sha256 hashes and re-run its stored reference",
                       description="Verify every file of ARTIFACT against the sha256 in its manifest, then, "
                                   "for each side whose libraries run on this machine, run the stored "
                                   "reference input and compare with the expected output.")
    p.add_argument("artifact", help="artifact directory (holds manifest.msgpack)")
    p.add_argument("--side", choices=("device", "edge", "both"), default="both", help="which side to run (default both)")
    p.add_argument("--backend", choices=("tvm", "onnxruntime", "all"), default="all",
                   help="runtime to check with (default all: every one available here)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="max abs error allowed, relative to the output's scale (default 0.0001)")
    p.set_defaults(func=run)


def check_files(path: Path, manifest) -> list[str]:
    """Files that are present but differ from the manifest (raises on none; lists absent ones)."""
    from edgecut.codegen.manifest import verify_files

    absent = [f for f in manifest.files if not (path / f).is_file()]
    verify_files(path, manifest, [f for f in manifest.files if f not in absent])
    return absent


def check_side(path: Path, manifest, side: str, backend: str, tolerance: float) -> tuple[bool, str]:
    """(ok, message) for one side and backend, running the stored reference."""
    from edgecut.codegen.load import load
    from edgecut.codegen.manifest import load_arrays, max_error

    ref = load_arrays(path / manifest.reference)
    part = load(path, side, backend)
    if side == "device":
        plan = manifest.fallback.id
        res = part.run(plan, dict(ref["inputs"]), early_exit=False)
    else:
        if "edge" not in ref:
            return True, "no plan runs on the edge"
        plan = ref["edge"]["plan"]
        res = part.run(plan, dict(ref["edge"]["tensors"]))
    want = ref["logits"][str(res.exit_id)]
    err = max_error(res.outputs["logits"], want)
    ok = err <= tolerance
    return ok, f"plan {plan}: max error {err:.2e} x scale ({'ok' if ok else f'over {tolerance:g}'}), {res.seconds * 1e3:.2f} ms"


def _runs_here(manifest, side: str, backend: str) -> str:
    """'' when `side` can run here with `backend`, else why not."""
    if backend == "onnxruntime":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnxruntime is not installed"
        return "" if manifest.onnx else "no ONNX copies"
    libs = manifest.libraries_of(side, "tvm")
    if not libs:
        return "no TVM libraries"
    target = manifest.targets.get(side, {})
    if target.get("tvm", {}).get("kind", "llvm") != "llvm":
        try:
            import tvm

            if not tvm.device(target["tvm"]["kind"], 0).exist:
                return f"no {target['tvm']['kind']} device here"
        except Exception as e:            # noqa: BLE001
            return f"{target['tvm']['kind']} runtime unavailable ({type(e).__name__})"
    arch = next(iter(libs.values())).arch
    if arch != platform.machine():
        return f"built for {arch} (target {target.get('name')}), this machine is {platform.machine()}"
    return ""


def run(args) -> int:
    from edgecut.codegen.manifest import Manifest

    path = Path(args.artifact)
    manifest = Manifest.read(path)
    absent = check_files(path, manifest)
    present = len(manifest.files) - len(absent)
    print(f"{path}: model {manifest.model}, format {manifest.format_version}, built with edgecut "
          f"{manifest.versions.get('edgecut')} / TVM {manifest.versions.get('tvm')}")
    print(f"files: {present} match their sha256" + (f", {len(absent)} absent: {', '.join(absent[:5])}" if absent else ""))
    failed = False
    sides = ("device", "edge") if args.side == "both" else (args.side,)
    backends = ("tvm", "onnxruntime") if args.backend == "all" else (args.backend,)
    for side in sides:
        for backend in backends:
            why = _runs_here(manifest, side, backend)
            needed = set()
            if not why:
                from edgecut.codegen.load import Part

                needed = set(Part.segments_needed(manifest, side))
                built = manifest.libraries_of(side, None)    # TVM, or ONNX Runtime where TVM could not build
                files = {manifest.onnx.get(s) for s in needed} if backend == "onnxruntime" else \
                    {f for lib in built.values() if lib.segment in needed for f in (lib.file, lib.params) if f}
                if any(f in absent for f in files):
                    why = "its files are absent"
            if why:
                print(f"{side} ({backend}): skipped, {why}")
                continue
            if not needed:
                print(f"{side} ({backend}): nothing runs on this side")
                continue
            ok, msg = check_side(path, manifest, side, backend, args.tolerance)
            failed |= not ok
            ort = sorted(s for s in needed if backend == "tvm" and built[s].backend == "onnxruntime")
            label = f"{backend}, {len(ort)} segment(s) on onnxruntime: {', '.join(ort)}" if ort else backend
            print(f"{side} ({label}): {msg}")
    return 1 if failed else 0
