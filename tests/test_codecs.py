"""Codecs for the crossing tensors: numpy reference, compiled steps (TVM and ONNX), the solver's
choice, and the wire over a real TCP server."""
import importlib.util
import inspect
import math
import socket
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import edgecut
from edgecut import codecs, zoo
from edgecut.codegen.artifact import _values, build_artifact
from edgecut.codegen.load import load
from edgecut.codegen.manifest import max_error
from edgecut.errors import ProtocolError, UsageError
from edgecut.frontend import meta
from edgecut.planning import RouteCost, choose
from edgecut.runtime import protocol as P
from edgecut.runtime.server import EdgeServer

_spec = importlib.util.spec_from_file_location("codegen_helpers", Path(__file__).parent / "codegen" / "conftest.py")
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)
make_table, three_cuts = _helpers.make_table, _helpers.three_cuts

RELU = np.maximum(np.random.default_rng(0).standard_normal((32, 6, 5, 7)), 0).astype(np.float32)


# --- numpy reference -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", codecs.known())
def test_every_codec_round_trips_within_its_rounding(name):
    c = codecs.parse(name)
    affine = codecs.calibrate_int8(RELU, (1, 6, 5, 7))
    x = RELU[:1]
    q = codecs.encode(c, x, affine)
    assert str(q.dtype) == codecs.WIRE_DTYPE[c.base]
    data = codecs.pack(c, q)
    back = codecs.unpack(c, data, str(q.dtype), q.shape)
    assert np.array_equal(back, q)                                 # the lossless stage is lossless
    y = codecs.decode(c, back, affine)
    step = {"fp32": 0.0, "fp16": 2.0 ** -11 * np.abs(x), "int8": affine.scale / 2 * (1 + 1e-6)}[c.base]
    assert np.all(np.abs(y - x) <= step + 1e-12)
    assert np.all(y[x == 0] == 0)                                    # ReLU zeros stay exact zeros
    assert codecs.packed_bytes(c, q) == (data.nbytes if isinstance(data, np.ndarray) else len(data))


def test_int8_is_per_channel_with_channels_and_per_tensor_without():
    a = codecs.calibrate_int8(RELU, (1, 6, 5, 7))
    assert a.scale.shape == (1, 6, 1, 1) and a.zero_point.shape == (1, 6, 1, 1)
    flat = codecs.calibrate_int8(RELU.reshape(32, -1)[:, :1], (1, 1))
    assert flat.scale.shape == ()
    again = codecs.Affine.from_dict(a.to_dict())
    assert np.array_equal(again.scale, a.scale) and np.array_equal(again.inv_scale, a.inv_scale)


def test_zstd_pays_on_relu_outputs():
    q = codecs.encode("int8", RELU[:1], codecs.calibrate_int8(RELU, (1, 6, 5, 7)))
    assert codecs.packed_bytes("int8+zstd", q) < q.nbytes


def test_unknown_codec_lists_the_known_ones():
    with pytest.raises(UsageError, match="int4.*fp32, fp32\\+zstd.*int8\\+lz4"):
        codecs.parse("int4")
    with pytest.raises(UsageError, match="unknown codec 'fp16\\+gzip'"):
        codecs.parse("fp16+gzip")
    with pytest.raises(UsageError, match="unknown codec"):
        edgecut.compile(zoo.get("tiny_chain"), torch.randn(1, 3, 16, 16), target="local", edge="local",
                        codecs=("fp32", "int4"), progress=False)


def test_calibration_data_of_the_wrong_shape_names_both_shapes():
    with pytest.raises(UsageError, match=r"\[32, 6, 5, 7\].*\[1, 6, 5, 8\]"):
        codecs.calibrate_int8(RELU, (1, 6, 5, 8), "relu_2")


def test_a_stream_of_the_wrong_length_is_a_protocol_error():
    q = np.zeros((1, 6, 5, 7), np.int8)
    for name in ("int8+zstd", "int8+lz4"):
        data = codecs.pack(name, q)
        with pytest.raises(ProtocolError, match="coded length disagrees"):
            codecs.unpack(name, data, "int8", (1, 6, 5, 8))
        with pytest.raises(ProtocolError, match="does not decode"):
            codecs.unpack(name, b"\x00garbage" + bytes(data)[:5], "int8", q.shape)


# --- the solver ----------------------------------------------------------------------------------
def test_the_solver_takes_a_lossy_codec_only_when_the_deadline_needs_it():
    fp32 = RouteCost("e1/mid", 1, 0.90, False, 0.010, 0.005, 40_000, 40)
    int8 = replace(fp32, plan_id="e1/mid@int8+zstd", codec="int8+zstd", up_bytes=4_000, device_s=0.011,
                   accuracy=0.89)                                     # measured: costs a point
    lossless = replace(fp32, plan_id="e1/mid@fp32+zstd", codec="fp32+zstd", up_bytes=30_000, device_s=0.012)
    local = RouteCost("e0/device", 0, 0.70, True, 0.030, 0.0, 0, 0)
    routes = [fp32, int8, lossless, local]
    # a fast link: fp32 fits, and its lossy twin, though faster, is not taken
    assert choose(routes, 100e6, 0.05).plan_id == "e1/mid"
    # 2 Mbit/s: 40 KB take 160 ms; the lossless stage is not enough, int8 fits
    assert choose(routes, 2e6, 0.05).plan_id == "e1/mid@int8+zstd"
    # a lossy plan that loses more than the early exit is not taken over it
    assert choose([replace(int8, accuracy=0.6), local], 2e6, 0.05).plan_id == "e0/device"
    # at equal accuracy the faster one wins: 30 KB with zstd at 8 Mbit/s, or a codec that costs nothing
    assert choose([fp32, lossless, local], 8e6, 0.05).plan_id == "e1/mid@fp32+zstd"
    assert choose([fp32, replace(int8, accuracy=0.90)], 100e6, 0.05).plan_id == "e1/mid@int8+zstd"


# --- compiled steps ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    """tiny_chain with fp32, fp16, int8 and int8+zstd at the cut after pool1, built through TVM
    and ONNX, int8 scales from the model's values on random inputs."""
    torch.manual_seed(0)
    model = zoo.get("tiny_chain").eval()
    x = torch.randn(1, 3, 16, 16)
    gm = edgecut.trace(model, x)
    table = make_table(gm, three_cuts(gm, ["pool1"]))
    mid = table.plans[1]
    node = mid.cut.crossing[0]
    seen = [_values(gm, (torch.randn(1, 3, 16, 16),)) for _ in range(16)]
    gm.meta[meta.CODEC_SCALES] = {n: codecs.calibrate_int8(np.concatenate([v[n] for v in seen]), seen[0][n].shape).to_dict()
                                  for n in (node, "x")}
    plans = [replace(mid, codec=c) for c in ("fp16", "int8", "int8+zstd")] + [replace(table.plans[0], codec="int8")]
    out = tmp_path_factory.mktemp("coded") / "art"
    manifest = build_artifact(gm, table, "local", "local", out, (x,), progress=False, candidates=plans)
    return model, x.numpy(), table, out, manifest, {n: codecs.Affine.from_dict(d)
                                                    for n, d in gm.meta[meta.CODEC_SCALES].items()}


def test_a_coded_input_cut_codes_the_input_in_a_device_call_of_its_own(coded):
    model, x, table, out, manifest, affines = coded
    route = manifest.route("e0/input@int8")
    assert route.crossing == ("x__int8",) and len(route.device) == 1 and route.edge
    seg = next(s for s in manifest.segments if s.name == route.device[0])
    assert seg.nodes == () and seg.inputs == ("x",) and seg.outputs == ("x__int8",)
    sent, got = _chain(out, "e0/input@int8", x)
    q = sent.outputs["x__int8"]
    assert codecs.within_rounding("int8", q, codecs.encode("int8", x, affines["x"]))
    want = load(out, "edge").run("e0/input", {"x": codecs.decode("int8", q, affines["x"])}).outputs["logits"]
    assert max_error(got.outputs["logits"], want) <= 1e-4


def _chain(out, plan_id, x, backend="tvm"):
    dev, edge = load(out, "device", backend), load(out, "edge", backend)
    res = dev.run(plan_id, {dev.input_names[0]: x})
    return res, (res if res.done else edge.run(plan_id, res.outputs))


def test_fp32_split_still_equals_whole(coded):
    model, x, table, out, manifest, _ = coded
    want = model(torch.from_numpy(x)).detach().numpy()
    for plan in table.plans:
        assert max_error(_chain(out, plan.id, x)[1].outputs["logits"], want) <= 1e-4, plan.id


@pytest.mark.parametrize("backend", ["tvm", "onnxruntime"])
@pytest.mark.parametrize("codec", ["fp16", "int8", "int8+zstd"])
def test_coded_edge_output_matches_the_codec_simulated_in_numpy(coded, codec, backend):
    model, x, table, out, manifest, affines = coded
    affine = affines["pool1"]
    base = codecs.parse(codec).base
    plan_id = f"e0/mid@{codec}"
    route = manifest.route(plan_id)
    assert route.codec == codec and route.crossing == (codecs.coded_name("pool1", base),)
    assert manifest.tensors[route.crossing[0]].dtype == codecs.WIRE_DTYPE[base]
    raw, _ = _chain(out, "e0/mid", x, backend)                       # the fp32 plan's crossing tensor
    sent, got = _chain(out, plan_id, x, backend)
    q = sent.outputs[route.crossing[0]]
    # the device's compiled quantize is numpy's, within one rounding step
    assert codecs.within_rounding(base, q, codecs.encode(base, raw.outputs["pool1"], affine))
    # the edge's compiled dequantize and the rest of the model are the fp32 edge part on numpy's decode
    edge = load(out, "edge", backend)
    want = edge.run("e0/mid", {"pool1": codecs.decode(base, q, affine)}).outputs["logits"]
    assert max_error(got.outputs["logits"], want) <= 1e-4


def test_coded_plans_share_their_libraries_and_only_coded_routes_get_new_ones(coded):
    *_, manifest, _ = coded
    r = manifest.routes
    assert r["e0/mid@int8"].device == r["e0/mid@int8+zstd"].device and r["e0/mid@int8"].edge == r["e0/mid@int8+zstd"].edge
    assert r["e0/mid@fp16"].device != r["e0/mid"].device
    assert len(manifest.segments) == 9          # input, mid (2), device-only, fp16 (2), int8 (2), coded input (2)
    assert not any(lib.backend == "onnxruntime" for lib in manifest.libraries)


# --- the wire ------------------------------------------------------------------------------------
def _connect(server, part) -> P.Channel:
    ch = P.Channel(socket.create_connection(server.address, timeout=10))
    assert ch.recv()["type"] == "challenge"
    ch.send(P.hello(*P.manifest_identity(part), None))
    assert ch.recv()["type"] == "welcome"
    return ch


def test_the_edge_refuses_a_codec_mismatch_and_a_bad_coded_length_and_stays_up(coded):
    model, x, table, out, manifest, _ = coded
    dev = load(out, "device")
    res = dev.run("e0/mid@int8+zstd", {dev.input_names[0]: x})
    server = EdgeServer(out, "127.0.0.1", 0, insecure=True, calibrate=False).start()
    try:
        ch = _connect(server, dev)
        ok = P.pack_tensors(res.outputs, "int8+zstd")
        ch.send(P.infer(1, "e0/mid@int8+zstd", ok, 5.0, "int8"))            # the wrong codec
        reply = ch.recv(deadline=None, frame_timeout=10)
        assert reply["type"] == "error" and reply["error"]["code"] == P.BAD_TENSOR
        assert "int8+zstd" in reply["error"]["message"] and "'int8'" in reply["error"]["message"]
        ch.send(P.infer(2, "e0/mid@int8+zstd", ok, 5.0))                   # no codec named: fp32
        assert ch.recv(frame_timeout=10)["error"]["code"] == P.BAD_TENSOR
        name = next(iter(res.outputs))
        short = {name: P.Packed("int8", res.outputs[name].shape, codecs.pack("int8+zstd",
                                                                              res.outputs[name][..., :-1].copy()))}
        ch.send(P.infer(3, "e0/mid@int8+zstd", short, 5.0, "int8+zstd"))    # decodes to fewer bytes
        reply = ch.recv(frame_timeout=10)
        assert reply["error"]["code"] == P.BAD_TENSOR and "coded length disagrees" in reply["error"]["message"]
        ch.send(P.infer(4, "e0/mid@int8+zstd", ok, 5.0, "int8+zstd"))       # same connection: answered
        reply = ch.recv(frame_timeout=10)
        assert reply["type"] == "result" and reply["id"] == 4
        logits = P.decode_tensors(reply["outputs"], "outputs")["logits"]
        want = load(out, "edge").run("e0/mid@int8", res.outputs).outputs["logits"]
        assert np.array_equal(logits, want)
        ch.close()
    finally:
        server.shutdown(drain_timeout=2.0)


def test_calibration_times_the_lossless_stage(coded):
    from edgecut.runtime.calibration import calibrate

    *_, out, manifest, _ = coded
    for side in ("device", "edge"):
        cal = calibrate(out, side, idle_pattern=(0.0,), repeats=2, warmup=0)
        assert {"e0/mid@int8", "e0/mid@int8+zstd"} <= set(cal.seconds(0.5))
        assert math.isfinite(cal.seconds(0.5)["e0/mid@int8+zstd"])


# --- compile --------------------------------------------------------------------------------------
def test_compile_makes_the_codec_a_plan_dimension_with_measured_accuracy_and_bytes(tmp_path):
    from edgecut.costmodel.profile import load_profile
    from edgecut.data import synthetic

    edge = load_profile("local")
    model, x = zoo.get("tiny_chain"), torch.randn(1, 3, 16, 16)
    data = synthetic((3, 16, 16), n=96, seed=1), synthetic((3, 16, 16), n=64, seed=2)
    kw = dict(target="local", edge="local", deadline=0.05, exits=None, data=data, profile=edge.scaled(20),
              edge_profile=edge, progress=False)
    with pytest.raises(UsageError, match="need data"):
        edgecut.compile(model, x, **{**kw, "data": None}, codecs=("fp32", "int8"))
    art = edgecut.compile(model, x, **kw, codecs=("fp32", "int8+zstd", "fp16"), out_dir=tmp_path / "a")
    measured, cands = art.info["codecs"], {p.id: p for p in art.manifest.candidates}
    offload = [p for p in cands.values() if p.codec == "fp32" and not p.cut.device_only]
    assert offload and set(measured) == {f"{p.id}@{c}" for p in offload for c in ("int8+zstd", "fp16")}
    for pid, v in measured.items():
        fp32 = cands[pid.rpartition("@")[0]]
        assert v["kept"] == (pid in cands) and v["fp32_bytes"] == fp32.cut.crossing_bytes
        if pid in cands:
            assert cands[pid].cut.crossing_bytes == round(v["bytes"])
            assert math.isnan(fp32.accuracy) or cands[pid].accuracy <= fp32.accuracy
            assert art.manifest.route(pid).codec == v["codec"]
        if v["codec"] == "fp16":
            assert v["bytes"] == fp32.cut.crossing_bytes / 2
    assert set(art.gm.meta[meta.CODEC_SCALES]) == {c for p in offload for c in p.cut.crossing}
    report = art.report()
    assert "crossing bytes per cut" in report and "int8+zstd" in report and "codec" in report.splitlines()[-len(
        art.table.plans) - 1]
    # the default stays fp32 only: nothing measured, no coded plan
    assert inspect.signature(edgecut.compile).parameters["codecs"].default == ("fp32",)


@pytest.mark.slow
def test_bench_codecs_runs_and_prints_its_last_line(tmp_path):
    import re
    import subprocess

    bench = Path(__file__).parent.parent / "bench" / "codecs.py"
    r = subprocess.run([sys.executable, str(bench), "--requests", "20", "--bandwidths", "1,8", "--epochs", "2",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stderr[-2000:]
    last = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"codecs: mean latency ratio (\d+\.\d\d|n/a) \(coded / fp32\) at <= 8 Mbit/s.*"
                        r"worst accuracy loss -?\d+\.\d points, bytes ratio (\d+\.\d\d|n/a)", last), last
