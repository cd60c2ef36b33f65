"""build: a Relax IRModule (weights as inputs) -> a compiled executable for one `Target`.

This is the single place that decides how edgecut's generated code is optimised; profiling
(costmodel), codegen of artifacts and the benchmarks all call `build`, so predictions describe
the deployed code.

Contract: `mod["main"]` takes the model inputs first, then the weights (as produced by
`relax.frontend.torch.from_fx(..., keep_params_as_input=True)` and `detach_params`). `build`
returns the executable plus the weights *as the executable wants them* (any layout transform is
done here, once, at compile time); at run time call `main(*inputs, *built.params)`.

The pipeline, top to bottom (`prepare` is shared with `edgecut.codegen.tune`, so a tuning
database recorded there matches the functions built here):

    prepare     batch norm into conv weights (edgecut/codegen/rewrites.py), convolutions to
                NHWC/HWIO, 3x3 stride-1 convolutions to Winograd (edgecut/codegen/winograd.py;
                its weight transform is lifted), ops -> TIR, fuse
                producers with their element-wise consumers, lift weight-only work out of main
    weights     run the lifted `main_transform_params` once on the host (layout changes,
                transposed dense weights): the library never pays for them at run time
    schedule    tuned records from the user's tuning database where they exist, then
                edgecut's own schedule rules (edgecut/codegen/schedules) for every other kernel
    compile     Relax VM lowering + LLVM for the target (mcpu resolved for the host)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecut import targets as _targets
from edgecut.codegen import rewrites, winograd
from edgecut.targets import Target

log = logging.getLogger(__name__)

# Convolutions run channels-last: the output channel is the contiguous axis of both the output
# and the (HWIO) weight, which is what the register-blocked kernel vectorizes.
DESIRED_LAYOUTS = {"relax.nn.conv2d": ["NHWC", "HWIO"]}


@dataclass
class Built:
    executable: object          # tvm.relax.VMExecutable
    params: list                # list[np.ndarray], in the order main expects after the inputs
    target: Target
    num_inputs: int


def build(mod, params, target: Target | str, *, num_inputs: int = 1, schedule: bool = True,
          tuning_dir: str | Path | None | bool = None, winograd_tile: int = 4) -> Built:
    """Compile `mod` for `target` with edgecut's schedules.

    schedule: False compiles TVM's unscheduled default (slow; for comparison only).
    tuning_dir: a MetaSchedule database folder (from `edgecut tune`) to apply first; None looks
    in the user's cache (`edgecut.codegen.tune.database_dir(target)`) and in the databases
    shipped with edgecut; False ignores every database.
    winograd_tile: the largest Winograd output tile (4, 2, or 0 for direct convolutions only).
    """
    import tvm

    t = _targets.get(target)
    tvm_target = t.tvm_target()
    params = [_to_numpy(p) for p in params]
    if not schedule:
        ex = tvm.compile(mod, target=tvm_target)
        return Built(ex, params, t, num_inputs)

    fused, weights1, constants = prepare(mod, num_inputs, winograd_tile=winograd_tile)
    params = params + constants
    with tvm_target:
        fused = apply_schedules(fused, tvm_target, _databases(t, tuning_dir))
    main_mod, weights2 = split_weight_prepack(fused)
    new_params = transform_weights(weights2, transform_weights(weights1, params))
    ex = tvm.compile(main_mod, target=tvm_target)
    return Built(ex, new_params, t, num_inputs)


def prepare(mod, num_inputs: int = 1, winograd_tile: int = 4):
    """Legalize, re-layout and fuse `mod`; return (main module, weight-transform module or None,
    constants). `constants` (arrays such as batch-norm running statistics, which the importer
    embeds) become weights appended after `params`, so their transforms are lifted as well.

    The main module's `main` takes the inputs then the transformed weights, and its kernels name
    their weight arguments in the `layout_free_buffers` attribute (schedules may repack those);
    the weight module's `main_transform_params` maps the original weights to main's."""
    import tvm
    from tvm import relax

    mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    mod, constants = rewrites.constants_to_params(mod)
    mod["main"] = rewrites.clip_as_min_max(mod)
    mod["main"] = mod["main"].with_attr("num_input", num_inputs)
    mod["main"] = rewrites.fold_batch_norm_into_conv(mod, num_inputs)
    mod = tvm.transform.Sequential([
        relax.transform.DecomposeOpsForInference(),   # other batch norms -> element-wise
        relax.transform.CanonicalizeBindings(),
    ])(mod)
    mod["main"] = rewrites.divide_by_weights_as_multiply(mod, num_inputs)
    mod = _convert_layout(mod)                        # NCHW/OIHW -> NHWC/HWIO
    mod = winograd.winograd_conv2d(mod, num_inputs, largest=winograd_tile)   # 3x3 stride-1 convs
    mod = relax.transform.LiftTransformParams()(mod)  # weight-only work -> main_transform_params
    main_mod = tvm.transform.Sequential([
        relax.transform.LegalizeOps(),                # every op -> a TIR PrimFunc
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FuseOps(),                    # conv/dense + bias, BN, ReLU, residual add
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ])(_only(mod, "main"))
    main_mod["main"] = main_mod["main"].with_attr("num_input", num_inputs)
    main_mod = relax.transform.AttachAttrLayoutFreeBuffers()(main_mod)
    weights = _weights_part(mod)
    if weights is not None:
        weights = relax.transform.LegalizeOps()(weights)
    return main_mod, weights, constants


def _convert_layout(mod):
    """ConvertLayout to DESIRED_LAYOUTS where the module has a convolution; as it is when the pass
    fails (TVM 0.27 raises std::bad_alloc on nn.MultiheadAttention's imported graph), logged."""
    import tvm
    from tvm import relax

    conv2d = tvm.ir.Op.get("relax.nn.conv2d")
    if not any(isinstance(b.value, relax.Call) and b.value.op.same_as(conv2d)
               for block in mod["main"].body.blocks for b in block.bindings):
        return mod
    try:
        return relax.transform.ConvertLayout(DESIRED_LAYOUTS)(mod)
    except Exception as e:  # noqa: BLE001 - NCHW code is correct, only slower
        log.warning("edgecut build: convolutions stay NCHW, ConvertLayout failed (%s: %s)", type(e).__name__,
                    (str(e).strip().splitlines() or [""])[-1][:200])
        return mod


def split_weight_prepack(mod):
    """Move the weight-repacking blocks that schedules added out of the kernels and out of
    `main` (into a second `main_transform_params`); return (main module, weight module)."""
    import tvm
    from tvm import relax

    mod = tvm.transform.Sequential([
        relax.transform.SplitLayoutRewritePreproc(),
        relax.transform.LiftTransformParams(),
        relax.transform.DeadCodeElimination(),
    ])(mod)
    return _only(mod, "main"), _weights_part(mod)


def _weights_part(mod):
    if any(gv.name_hint == "main_transform_params" for gv in mod.get_global_vars()):
        return _only(mod, "main_transform_params")
    return None


def _only(mod, entry: str):
    """`mod` with the Relax function `entry` and what it calls, nothing else."""
    import tvm
    from tvm import relax

    keep = {gv: f for gv, f in mod.functions_items()
            if not isinstance(f, relax.Function) or gv.name_hint == entry}
    return relax.transform.DeadCodeElimination(entry_functions=[entry])(
        tvm.IRModule(keep, attrs=mod.attrs))


def transform_weights(weights_mod, params: list[np.ndarray]) -> list[np.ndarray]:
    """Run `main_transform_params` once, on this machine, and return the weights `main` wants."""
    if weights_mod is None:
        return list(params)
    import tvm
    from tvm import relax

    host = _targets.get("local").tvm_target(opt_level=0)   # runs once: LLVM's -O0 builds it 2x faster
    with host:
        weights_mod = apply_schedules(weights_mod, host, [])
    ex = tvm.compile(weights_mod, target=host)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main_transform_params"]([tvm.runtime.tensor(p) for p in params])
    return [np.asarray(o.numpy()) for o in out]


def apply_schedules(mod, tvm_target, databases: list):
    """Schedule every PrimFunc: tuned records first (from `databases`), rules for the rest."""
    from tvm import relax

    from edgecut.codegen.schedules import schedule_module

    for db in databases:
        with db:  # MetaScheduleApplyDatabase reads the current database
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    return schedule_module(mod, tvm_target)


def _databases(t: Target, tuning_dir) -> list:
    """The tuning records for `t` merged into one in-memory database, so that each kernel gets
    the fastest record of any folder (MetaSchedule's or the measured rule schedules)."""
    if tuning_dir is False:
        return []
    from tvm.s_tir import meta_schedule as ms

    from edgecut.codegen import tune

    if tuning_dir not in (None, True):
        dirs = [Path(tuning_dir), Path(tuning_dir) / tune.RULES]
    else:
        dirs = tune.database_dirs(t)
    merged, n = ms.database.MemoryDatabase(), 0
    for d in dirs:
        db = tune.open_database(d)
        if db is None:
            continue
        for rec in db.get_all_tuning_records():
            if rec.run_secs and float(rec.run_secs[0]) < 1e9:  # 1e10 marks a failed candidate
                merged.commit_workload(rec.workload.mod)
                merged.commit_tuning_record(rec)
                n += 1
    return [merged] if n else []


def _to_numpy(p) -> np.ndarray:
    return np.asarray(p.numpy() if hasattr(p, "numpy") else p)
