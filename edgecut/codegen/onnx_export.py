"""ONNX copies of segments: `export_segment` writes one with torch.onnx, `OnnxSegment` runs one
with onnxruntime (torch-free: the `backend="onnxruntime"` path of `edgecut.load` uses it).

Input and output names of the ONNX graph are the fx node names of the segment's inputs and
outputs, so the runtime feeds and reads them exactly as it does the TVM libraries.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from edgecut.errors import ArtifactError, CodegenError

OPSET = 17


def export_segment(gm, example_inputs, path: str | Path, input_names, output_names) -> None:
    """Export the segment GraphModule `gm` (returning a tuple) to `path`.

    TorchScript-based export first (fast, one file); the dynamo exporter when it fails."""
    import torch

    path = Path(path)
    # copies: exporting runs the segment, and an in-place op on an input (SiLU(inplace=True) right
    # after a boundary) would otherwise rewrite the caller's reference arrays
    args = tuple(torch.tensor(np.asarray(x)) for x in example_inputs)
    errors = []
    for dynamo in (False, True):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kwargs = dict(input_names=list(input_names), output_names=list(output_names), dynamo=dynamo)
                if dynamo:
                    kwargs.update(external_data=False, verbose=False)
                else:
                    kwargs.update(opset_version=OPSET, do_constant_folding=True)
                with torch.no_grad(), (contextlib.nullcontext() if dynamo else _quiet_stdout()):
                    torch.onnx.export(gm, args, str(path), **kwargs)
            _check_names(path, input_names, output_names)
            return
        except Exception as e:            # noqa: BLE001 - both exporters' failures are reported
            errors.append(f"{'dynamo' if dynamo else 'torchscript'}: {type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[0][:300]}")
    raise CodegenError(f"ONNX export of {path.stem} failed ({'; '.join(errors)}); "
                       "build with onnx=False to skip the ONNX copies")


@contextlib.contextmanager
def _quiet_stdout():
    """File descriptor 1 to /dev/null: the TorchScript exporter prints its whole graph there when
    an op has no ONNX symbolic (nn.MultiheadAttention), before the dynamo exporter takes over."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _check_names(path: Path, input_names, output_names) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ins = [i.name for i in model.graph.input]
    outs = [o.name for o in model.graph.output]
    # an input the segment does not read is dropped by the exporter; all outputs must be there
    if list(outs) != list(output_names) or not set(ins) <= set(input_names):
        raise CodegenError(f"ONNX export of {path.stem}: graph has inputs {ins} and outputs {outs}, "
                           f"expected {list(input_names)} and {list(output_names)}")


class OnnxSegment:
    """One segment run by onnxruntime on the CPU: `run(list of arrays) -> list of arrays`."""

    def __init__(self, path: str | Path, input_names, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ArtifactError("backend='onnxruntime' needs the onnxruntime package: pip install onnxruntime") from e
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_names = list(input_names)
        self.feeds = [i.name for i in self.session.get_inputs()]

    def run(self, inputs) -> list[np.ndarray]:
        by_name = dict(zip(self.input_names, inputs))
        return self.session.run(None, {n: by_name[n] for n in self.feeds})
