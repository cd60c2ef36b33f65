"""code_plans: the codec as a dimension of the plan: (exit, cut) candidates -> (exit, cut, codec).

For every candidate that sends tensors and every codec asked for beyond fp32 (`edgecut.codecs`),
a plan with that codec, whose numbers are measured, not assumed:
- int8 scales per crossing tensor from its values on the training data (`codecs.calibrate_int8`),
  written to `gm.meta[meta.CODEC_SCALES]` for codegen;
- accuracy: the exit's recorded accuracy less the drop measured on the validation data with the
  crossing tensors coded and decoded (numpy reference) where the edge reads them; a plan whose
  drop exceeds `max_loss` is left out (and listed as such); a lossy plan is never credited above
  its fp32 twin, so the solver takes it only when the fp32 plan does not fit;
- bytes: the mean coded size on validation samples (lossless stage included) becomes the plan's
  `cut.crossing_bytes`; `encode_s` / `decode_s`: the lossless stage's seconds here (the base
  step runs inside the segments and is timed with them).

Reads `gm.meta[meta.EXITS]` (the training view's exits and accuracies); needs `insert_exits`
(or a plain graph returning its logits) and `annotate_shapes` before. Writes
`gm.meta[meta.CODEC_SCALES]`; returns the plans and a report {plan id: measured values}.
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch
import torch.fx as fx

from edgecut import codecs
from edgecut.exits.train import check_data, loader
from edgecut.frontend import meta


class _Coded(fx.Interpreter):
    """Runs the graph with `crossing` values coded and decoded for the nodes off `device`."""

    def __init__(self, gm, device=frozenset(), crossing=frozenset(), roundtrip=None, record=()):
        super().__init__(gm)
        self.device, self.crossing, self.roundtrip = device, crossing, roundtrip
        self.record, self.seen, self._coded = set(record), {}, {}

    def run(self, *args):
        self._coded = {}
        return super().run(*args)

    def run_node(self, n):
        swap = [] if n.name in self.device or self.roundtrip is None else \
            [a for a in n.all_input_nodes if a.name in self.crossing]
        saved = {a: self.env[a] for a in swap}
        for a in swap:
            if a.name not in self._coded:
                self._coded[a.name] = self.roundtrip(a.name, saved[a])
            self.env[a] = self._coded[a.name]
        try:
            out = super().run_node(n)
        finally:
            self.env.update(saved)
        if n.name in self.record:
            self.seen.setdefault(n.name, []).append(out.detach().cpu().numpy().copy())
        return out


def _exit_index(gm) -> dict:
    return {e["id"]: i for i, e in enumerate(sorted(gm.meta.get(meta.EXITS) or (), key=lambda e: e["id"]))}


def _logits(out, exit_id, index):
    if isinstance(out, (tuple, list)):
        return out[index.get(exit_id, len(out) - 1)]
    return out


def _accuracy(interp, batches, exit_id, index) -> float:
    right = total = 0
    with torch.no_grad():
        for x, y in batches:
            z = _logits(interp.run(x), exit_id, index)
            right += int((z.argmax(1) == y).sum())
            total += len(y)
    return right / max(total, 1)


def _values(gm, batches, names, limit: int) -> dict:
    """node -> [N, ...] values of `names` on up to `limit` samples of `batches`."""
    rec, n = _Coded(gm, record=names), 0
    with torch.no_grad():
        for x, _ in batches:
            rec.run(x)
            n += len(x)
            if n >= limit:
                break
    return {k: np.concatenate(v)[:limit] for k, v in rec.seen.items()}


def code_plans(gm: fx.GraphModule, plans, names, train, val, max_loss: float = 0.01, *, samples: int = 512,
               byte_samples: int = 64) -> tuple:
    """(plans with their coded twins, report): see the module docstring. `names`: codec names
    (`codecs.parse_all`); train / val: Datasets or DataLoaders of (input, label)."""
    names = codecs.parse_all(names)
    plans = tuple(plans)
    extra = [codecs.parse(n) for n in names if n != "fp32"]
    if not extra:
        return plans, {}
    offload = [p for p in plans if not p.cut.device_only and p.codec == "fp32"]
    crossing = sorted({c for p in offload for c in p.cut.crossing})
    shapes = {n.name: n.meta.get(meta.SHAPE) for n in gm.graph.nodes}
    train_b, val_b = loader(train, 64, shuffle=False), loader(val, 64, shuffle=False)
    check_data(gm, train_b, "codec calibration")
    check_data(gm, val_b, "codec validation")
    gm.eval()
    if any(c.base == "int8" for c in extra):                      # scales from the training data
        seen = _values(gm, train_b, crossing, samples)
        gm.meta[meta.CODEC_SCALES] = {c: codecs.calibrate_int8(seen[c], shapes[c], f"crossing tensor {c!r}").to_dict()
                                      for c in crossing}
    scales = {c: codecs.Affine.from_dict(d) for c, d in (gm.meta.get(meta.CODEC_SCALES) or {}).items()}
    index = _exit_index(gm)
    val_values = _values(gm, val_b, crossing, byte_samples)
    base_acc = {e: _accuracy(_Coded(gm), val_b, e, index) for e in {p.exit for p in offload}}
    out, report = list(plans), {}
    for p in offload:
        drops = {}
        for base in {c.base for c in extra if c.lossy}:
            def roundtrip(node, t, base=base):
                a = scales.get(node)
                x = codecs.decode(base, codecs.encode(base, t.detach().cpu().numpy(), a), a)
                return torch.from_numpy(x)
            acc = _accuracy(_Coded(gm, frozenset(p.cut.device), frozenset(p.cut.crossing), roundtrip), val_b,
                            p.exit, index)
            drops[base] = (base_acc[p.exit] - acc, acc)
        for c in extra:
            drop, measured = drops.get(c.base, (0.0, base_acc[p.exit]))
            nbytes, enc, dec = _coded_bytes(c, p.cut.crossing, val_values, scales)
            coded = replace(p, codec=c.name, cut=replace(p.cut, crossing_bytes=int(round(nbytes))),
                            accuracy=float(min(p.accuracy, p.accuracy - drop)))
            report[coded.id] = {"codec": c.name, "accuracy": float(coded.accuracy), "measured_accuracy": measured,
                                "loss": float(drop), "bytes": float(nbytes), "fp32_bytes": int(p.cut.crossing_bytes),
                                "encode_s": enc, "decode_s": dec, "kept": bool(drop <= max_loss)}
            if drop <= max_loss:
                out.append(coded)
    return tuple(out), report


def _coded_bytes(c, crossing, values: dict, scales: dict) -> tuple:
    """(mean bytes sent, mean seconds of the lossless encode, of its decode) per sample of
    `values` for the tensors `crossing` coded with `c`."""
    n = min(len(values[name]) for name in crossing)
    total = enc = dec = 0.0
    for i in range(n):
        for name in crossing:
            q = codecs.encode(c.base, values[name][i:i + 1], scales.get(name))
            t0 = time.perf_counter()
            data = codecs.pack(c, q)
            t1 = time.perf_counter()
            codecs.unpack(c, data, str(q.dtype), q.shape, name)
            t2 = time.perf_counter()
            total += data.nbytes if isinstance(data, np.ndarray) else len(data)
            enc, dec = enc + t1 - t0, dec + t2 - t1
    return total / n, (enc / n if c.lossless else 0.0), (dec / n if c.lossless else 0.0)
