"""The corpus (issue 16): models this project did not write, compiled as a user would, and split
equals whole checked at every cut candidate.

Models are timm's definitions with random weights (pretrained=False: nothing is downloaded),
smallest variants of many families. Parameters that the initialiser sets to one value (zero
heads, unit norms, zero last BN of a residual branch, 1e-6 layer scales) get random values
(`edgecut.zoo.vary_constant_parameters`): otherwise a branch scaled by 0 or 1e-6 hides what its
layers compute from the check, and a zero head makes it vacuous (a row whose output is the same
for every class fails). Where that makes eager fp32 itself drift from fp64 by more than the
tolerance (LeViT), only the vanishing ones (below 1e-3) are varied (`reference_drift`). Most get
settled BatchNorm statistics (`edgecut.zoo.settle_batchnorm`, random inputs), some stay as
initialised. For each model:

1. `edgecut.compile(model, x, target="pi4", edge="local", deadline=10, exits=None,
   profile=local.scaled(20), edge_profile=local, rtt="20ms")`: the device is planned as this
   machine 20x slower (relabelled pi4: the shipped pi4 profile is an uncalibrated guess), so the
   table holds real splits. Its wall time is the "compile s" column.
2. Every plan of that table through `Artifact.simulate` (the x86 edge build; the aarch64 device
   part runs its ONNX copy here), compared with eager PyTorch.
3. Every cut candidate `find_cuts` proposes, in one x86 build with a boundary at each
   (`edgecut.codegen.check_cuts`), each route compared with eager: "cuts ok/checked" and the
   worst error / output scale.
4. With --qemu, the pi4 device library of the listed models runs device-only under
   qemu-aarch64 (scripts/aarch64-env.sh) and is compared with eager.

    python bench/corpus.py [--subset fast|all] [--models a,b] [--jobs N] [--qemu a,b] [--json out.json]

Each model runs in its own process (TVM state, memory), killed after --timeout seconds. The
last line is `corpus: K/N compile, M/N split-equals-whole at every cut, median compile X s`.
Timings on a machine shared with other work are for orientation only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

TOLERANCE = 1e-4

# name -> (family, input side, settle BatchNorm, extra create_model kwargs)
CORPUS = {
    "resnet10t": ("ResNet", 224, False, {}),
    "resnet18": ("ResNet", 224, True, {}),
    "resnet50": ("ResNet", 224, True, {}),
    "resnext26ts": ("ResNeXt", 224, True, {}),
    "skresnet18": ("SKNet", 224, True, {}),
    "regnetx_002": ("RegNet", 224, True, {}),
    "regnety_002": ("RegNet", 224, False, {}),
    "efficientnet_b0": ("EfficientNet", 224, True, {}),
    "efficientnet_lite0": ("EfficientNet", 224, False, {}),
    "tf_efficientnetv2_b0": ("EfficientNetV2", 224, True, {}),
    "mobilenetv3_small_050": ("MobileNetV3", 224, True, {}),
    "mobilenetv3_large_100": ("MobileNetV3", 224, True, {}),
    "mobilenetv2_050": ("MobileNetV2", 224, False, {}),
    "mobilenetv4_conv_small": ("MobileNetV4", 224, True, {}),
    "ghostnet_050": ("GhostNet", 224, False, {}),
    "ghostnetv2_100": ("GhostNet", 224, True, {}),
    "convnext_atto": ("ConvNeXt", 224, True, {}),
    "convnextv2_atto": ("ConvNeXt", 224, True, {}),
    "densenet121": ("DenseNet", 224, False, {}),
    "inception_v3": ("Inception", 299, True, {}),
    "inception_next_atto": ("Inception", 224, True, {}),
    "vgg11": ("VGG", 224, True, {}),
    "vit_tiny_patch16_224": ("ViT", 224, True, {}),
    "vit_small_patch32_224": ("ViT", 224, True, {}),
    "deit_tiny_patch16_224": ("DeiT", 224, True, {}),
    "deit_tiny_distilled_patch16_224": ("DeiT", 224, True, {}),
    "swin_tiny_patch4_window7_224": ("Swin", 224, True, {}),
    "mobilevit_xxs": ("MobileViT", 256, True, {}),
    "mobilevitv2_050": ("MobileViT", 256, True, {}),
    "efficientformer_l1": ("EfficientFormer", 224, True, {}),
    "efficientformerv2_s0": ("EfficientFormer", 224, True, {}),
    "lcnet_050": ("LCNet", 224, True, {}),
    "mnasnet_small": ("MnasNet", 224, False, {}),
    "fbnetc_100": ("FBNet", 224, True, {}),
    "mixnet_s": ("MixNet", 224, True, {}),
    "tinynet_e": ("TinyNet", 106, True, {}),
    "rexnet_100": ("ReXNet", 224, True, {}),
    "repvgg_a0": ("RepVGG", 224, False, {}),
    "levit_128s": ("LeViT", 224, True, {}),
    "pit_ti_224": ("PiT", 224, True, {}),
    "convit_tiny": ("ConViT", 224, True, {}),
    "xcit_nano_12_p16_224": ("XCiT", 224, True, {}),
    "mobileone_s0": ("MobileOne", 224, True, {}),
    "fastvit_t8": ("FastViT", 256, True, {}),
    "edgenext_xx_small": ("EdgeNeXt", 256, True, {}),
    "poolformer_s12": ("PoolFormer", 224, True, {}),
    "resmlp_12_224": ("ResMLP", 224, True, {}),
    "gmlp_ti16_224": ("gMLP", 224, True, {}),
    "dla46_c": ("DLA", 224, True, {}),
    "hrnet_w18_small": ("HRNet", 224, True, {}),
    "nf_regnet_b0": ("NF-RegNet", 224, True, {}),
}
# tiny models at small inputs: the default test run checks these (tests/zoo/test_corpus.py)
FAST = {
    "mobilenetv3_small_050": ("MobileNetV3", 32, True, {}),
    "resnet10t": ("ResNet", 32, False, {}),
    "vit_tiny_patch16_224": ("ViT", 32, True, {"img_size": 32, "depth": 1}),
    "convnext_atto": ("ConvNeXt", 32, True, {"depths": (1, 1, 1, 1)}),
}
QEMU_DEFAULT = ("mobilenetv3_small_050", "lcnet_050", "resnet10t")


def _stub_torchvision_ops() -> None:
    """timm imports torchvision; its compiled ops do not load here (installed --no-deps)."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))


def make_model(name: str, spec: tuple):
    """(model in eval mode, example input) of corpus entry `name`."""
    _stub_torchvision_ops()
    import timm
    import torch

    from edgecut import zoo

    family, side, settle, kwargs = spec
    shape = (1, 3, side, side)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    for only_vanishing in (False, True):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
        zoo.vary_constant_parameters(model, only_vanishing=only_vanishing)   # zero heads, 1e-6 layer scales
        if settle:
            zoo.settle_batchnorm(model, (2, 3, side, side))
        if only_vanishing or reference_drift(model, x) <= TOLERANCE:
            return model, x


def reference_drift(model, x) -> float:
    """How far eager fp32 is from eager fp64 on `x`, x the output's scale: a reference that is
    itself off by more than the tolerance cannot judge a compiled copy. With every constant
    parameter varied, LeViT's is (6.8e-3: its normalised branches no longer start at 0), so
    make_model varies only the vanishing ones there (1.8e-5)."""
    import copy

    import torch

    from edgecut.codegen.manifest import max_error

    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double()).numpy()
        return max_error(model(x).numpy(), want)


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {(lines[0] if lines else '')[:240]}"


def check_model(name: str, spec: tuple, work: Path, qemu: bool = False, device_target: str = "pi4") -> dict:
    """Compile, run the table, check every cut (and qemu): one corpus row. `device_target`
    "local" skips the cross-compile (the default test run's fast subset)."""
    import warnings

    import numpy as np
    import torch

    import edgecut
    from edgecut.codegen.check_cuts import check_cuts
    from edgecut.codegen.manifest import max_error
    from edgecut.costmodel.profile import load_profile
    from edgecut.passes import find_cuts

    warnings.simplefilter("ignore")
    row = {"name": name, "family": spec[0], "input": spec[1], "settled": spec[2], "params_m": math.nan,
           "compiles": False, "cuts": 0, "cuts_ok": 0, "worst": math.nan, "table_worst": math.nan,
           "compile_s": math.nan, "check_s": math.nan, "fallbacks": 0, "qemu": None, "stage": "model", "cause": ""}
    try:
        model, x = make_model(name, spec)
        row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        with torch.no_grad():
            want = model(x).numpy()
        if float(np.ptp(want)) == 0.0:
            raise ValueError("the model's output is the same for every class: comparing with it checks nothing")
        local = load_profile("local")
        device = dataclasses.replace(local.scaled(20), target=device_target, name=f"local-x20-as-{device_target}")
        row["stage"] = "compile"
        t0 = time.perf_counter()
        art = edgecut.compile(model, x, target=device_target, edge="local", deadline=10, exits=None,
                              profile=device, edge_profile=local, rtt="20ms",
                              out_dir=work / "pi4", progress=False, name=name)
        row["compile_s"], row["compiles"] = time.perf_counter() - t0, True
        row["fallbacks"] = sum(lib.backend == "onnxruntime" for lib in art.manifest.libraries)
        row["phases"] = art.manifest.info.get("compile_s", {})
        row["plans"] = [p.cut.name for p in art.table.plans]
        row["stage"] = "table"
        row["table_worst"] = max(max_error(art.simulate(x, bandwidth=b).output, want) for b in art.table.bounds)
        row["stage"] = "every cut"
        cuts = find_cuts(art.gm)
        t0 = time.perf_counter()
        chk = check_cuts(art.gm, (x,), cuts, out_dir=work / "cuts", onnx=False)
        row["check_s"] = time.perf_counter() - t0
        row["cuts"], row["cuts_ok"] = len(chk.errors), sum(e <= TOLERANCE for e in chk.errors.values())
        row["worst"] = max(max(chk.errors.values()), max_error(art.gm(x).detach().numpy(), want))
        row["fallbacks"] += len(chk.fallbacks)
        if chk.failures:
            cut, why = next(iter(chk.failures.items()))
            row["cause"] = f"route {cut}: {why[:200]}"
        elif not chk.ok:
            cut, err = chk.worst
            row["cause"] = f"cut {cut} is {err:.2e} x scale off"
        if qemu:
            row["stage"] = "qemu"
            row["qemu"] = _qemu_error(work, x.numpy(), want)
        row["stage"] = "done"
    except Exception as e:  # noqa: BLE001 - a row reports its failure
        row["cause"] = f"{row['stage']}: {_one_line(e)}"
        row["trace"] = traceback.format_exc()[-3000:]
    return row


_QEMU_SCRIPT = '''
import sys, numpy as np, edgecut
part = edgecut.load(sys.argv[1], "device")
x = np.load(sys.argv[2])
res = part.run(part.fallback_plan_id, {part.input_names[0]: x}, early_exit=False)
np.save(sys.argv[3], res.outputs["logits"])
'''


def _qemu_error(work: Path, x, want) -> float:
    """Run the pi4 artifact's device-only plan under qemu-aarch64; its error vs eager."""
    import numpy as np

    from edgecut.codegen import qemu
    from edgecut.codegen.manifest import max_error

    why = qemu.available()
    if why:
        raise RuntimeError(f"qemu: {why}")
    (work / "qemu.py").write_text(_QEMU_SCRIPT)
    np.save(work / "x.npy", x)
    proc = qemu.run_aarch64(work / "qemu.py", work / "pi4", work / "x.npy", work / "logits.npy", timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"qemu run failed: {proc.stderr.strip().splitlines()[-1:]}")
    return max_error(np.load(work / "logits.npy"), want)


def _worker(name, spec, work, qemu, out_path):
    import logging

    logging.getLogger("edgecut").setLevel(logging.ERROR)  # schedule notes would break the table
    row = check_model(name, spec, Path(work), qemu)
    Path(out_path).write_text(json.dumps(row, default=str))


def run_corpus(entries: dict, jobs: int = 1, timeout: float = 1800, qemu=(), keep=None, on_row=None) -> list:
    """Each model in its own process, `jobs` at a time; rows in the order given."""
    ctx = mp.get_context("spawn")
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="edgecut-corpus-"))
    pending, running, rows = list(entries.items()), {}, {}
    while pending or running:
        while pending and len(running) < max(1, jobs):
            name, spec = pending.pop(0)
            work = root / name
            work.mkdir(parents=True, exist_ok=True)
            out = work / "row.json"
            out.unlink(missing_ok=True)
            p = ctx.Process(target=_worker, args=(name, spec, str(work), name in qemu, str(out)), daemon=True)
            p.start()
            running[name] = (p, time.monotonic(), out, spec)
        time.sleep(0.5)
        for name, (p, t0, out, spec) in list(running.items()):
            late = time.monotonic() - t0 > timeout
            if p.is_alive() and not late:
                continue
            if p.is_alive():
                p.terminate()
                p.join(10)
            p.join()
            if out.exists():
                row = json.loads(out.read_text())
            else:
                why = f"timed out after {timeout:.0f} s" if late else f"worker died (exit code {p.exitcode})"
                row = {"name": name, "family": spec[0], "input": spec[1], "compiles": False, "cuts": 0,
                       "cuts_ok": 0, "cause": why, "params_m": math.nan, "worst": math.nan, "compile_s": math.nan}
            rows[name] = row
            del running[name]
            if on_row:
                on_row(row)
    return [rows[n] for n in entries]


def split_ok(row: dict) -> bool:
    return bool(row.get("compiles")) and row.get("cuts", 0) > 0 and row.get("cuts_ok") == row.get("cuts") and (
        row.get("worst", math.inf) <= TOLERANCE)


HEADER = f"{'model':34s} {'family':15s} {'params':>7s} {'in':>4s} {'compiles':>8s} {'cuts ok':>9s} " \
         f"{'worst/scale':>11s} {'compile s':>9s}  cause"


def format_row(r: dict) -> str:
    cuts = f"{r.get('cuts_ok', 0)}/{r.get('cuts', 0)}"
    worst = r.get("worst", math.nan)
    worst = "-" if worst is None or (isinstance(worst, float) and math.isnan(worst)) else f"{float(worst):.1e}"
    cs = r.get("compile_s", math.nan)
    cs = "-" if cs is None or (isinstance(cs, float) and math.isnan(cs)) else f"{float(cs):.0f}"
    q = "" if r.get("qemu") is None else f" [qemu {float(r['qemu']):.1e}]"
    return (f"{r['name']:34s} {r.get('family', ''):15s} {float(r.get('params_m') or math.nan):6.1f}M "
            f"{r.get('input', ''):>4} {'yes' if r.get('compiles') else 'no':>8s} {cuts:>9s} {worst:>11s} "
            f"{cs:>9s}  {r.get('cause', '')}{q}")


def summary(rows: list) -> str:
    n = len(rows)
    k = sum(bool(r.get("compiles")) for r in rows)
    m = sum(split_ok(r) for r in rows)
    times = [float(r["compile_s"]) for r in rows if r.get("compiles")]
    med = statistics.median(times) if times else math.nan
    worst = max((r for r in rows if r.get("compiles")), key=lambda r: float(r["compile_s"]), default=None)
    slowest = f"slowest compile {float(worst['compile_s']):.0f} s ({worst['name']})\n" if worst else ""
    return (f"{slowest}corpus: {k}/{n} compile, {m}/{n} split-equals-whole at every cut, "
            f"median compile {med:.0f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subset", choices=("all", "fast"), default="all")
    ap.add_argument("--models", help="comma-separated corpus names (default: the whole subset)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per model")
    ap.add_argument("--qemu", default=",".join(QEMU_DEFAULT),
                    help="models whose pi4 library also runs under qemu-aarch64 ('' for none)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--keep", help="keep every artifact under this folder")
    args = ap.parse_args(argv)
    pool = FAST if args.subset == "fast" else CORPUS
    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        unknown = [n for n in names if n not in pool and n not in CORPUS]
        if unknown:
            ap.error(f"unknown models {unknown}; the corpus has {', '.join(CORPUS)}")
        entries = {n: pool.get(n) or CORPUS[n] for n in names}
    else:
        entries = dict(pool)
    qemu = {n.strip() for n in args.qemu.split(",") if n.strip()}
    print(HEADER, flush=True)
    done = []

    def on_row(r):
        print(format_row(r), flush=True)
        done.append(r)
        if args.json:  # rows so far, so that a long run stopped midway keeps what it measured
            Path(args.json).write_text(json.dumps(done, indent=1, default=str))

    rows = run_corpus(entries, args.jobs, args.timeout, qemu, args.keep, on_row=on_row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    print(summary(rows), flush=True)
    return 0 if all(split_ok(r) for r in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    sys.exit(main())
