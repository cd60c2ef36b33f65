"""Build artifacts of tiny models with real TVM and ONNX, load each side, chain the plans."""
import json

import msgpack
import numpy as np
import pytest
import torch
from conftest import make_cut, make_table, three_cuts

from edgecut import zoo
from edgecut.cli import main as cli
from edgecut.codegen.artifact import build_artifact
from edgecut.codegen.load import load
from edgecut.codegen.manifest import FORMAT_VERSION, MANIFEST, Manifest, load_arrays, max_error
from edgecut.errors import ArtifactError, CodegenError
from edgecut.frontend import meta
from edgecut.passes.insert_exits import insert_exits

MIDDLE = {"tiny_chain": ["pool1"], "tiny_dag": ["add"]}


def chain(path, plan_id, x, backend="tvm", early_exit=True):
    dev, edge = load(path, "device", backend), load(path, "edge", backend)
    res = dev.run(plan_id, {dev.input_names[0]: x}, early_exit=early_exit)
    return res if res.done else edge.run(plan_id, res.outputs)


@pytest.fixture(scope="module", params=["tiny_chain", "tiny_dag"])
def built(request, tmp_path_factory):
    torch.manual_seed(0)
    name = request.param
    import edgecut

    model = zoo.get(name)
    x = torch.randn(*zoo.default_input_shape(name))
    gm = edgecut.trace(model, x)
    table = make_table(gm, three_cuts(gm, MIDDLE[name]))
    out = tmp_path_factory.mktemp(name)
    manifest = build_artifact(gm, table, "local", "local", out, (x,), progress=False)
    return name, model, x, table, out, manifest


@pytest.mark.parametrize("backend", ["tvm", "onnxruntime"])
def test_every_plan_reproduces_pytorch(built, backend):
    name, model, x, table, out, manifest = built
    want = model(x).detach().numpy()
    for plan in table.plans:
        res = chain(out, plan.id, x.numpy(), backend)
        assert res.done and res.exit_id == 0
        assert max_error(res.outputs["logits"], want) <= 1e-4, (name, plan.id, backend)


def test_layout_and_manifest(built):
    name, model, x, table, out, manifest = built
    assert (out / "manifest.json").is_file() and (out / MANIFEST).is_file()
    assert json.loads((out / "manifest.json").read_text())["model"] == manifest.model
    again = Manifest.read(out)
    assert again.table == table and again.routes == manifest.routes and again.files == manifest.files
    for seg in manifest.segments:
        assert (out / "onnx" / f"{seg.name}.onnx").is_file()
        sides = [lib.side for lib in manifest.libraries if lib.segment == seg.name]
        assert sides and all((out / side / f"{seg.name}.so").is_file() and (out / side / f"{seg.name}.params").is_file()
                             for side in sides)
    for side in ("device", "edge"):       # every weight once per side, shared by the libraries using it
        assert (out / side / "weights.msgpack").is_file() and f"{side}/weights.msgpack" in manifest.files
        store = load_arrays(out / side / "weights.msgpack")
        refs = [r["ref"] for lib in manifest.libraries if lib.side == side for r in load_arrays(out / lib.params)]
        assert set(refs) == set(store) and len(store) < len(refs)     # overlapping libraries share weights
    assert all(len(h) == 64 for h in manifest.files.values())
    assert manifest.versions["tvm"] and manifest.targets["device"]["name"] == "local"
    assert all(c["tvm_vs_torch"] <= 1e-4 and c["onnx_vs_tvm"] <= 1e-4 for c in manifest.checks.values())
    mid = manifest.routes["e0/mid"]
    assert mid.device and mid.edge and mid.crossing == tuple(MIDDLE[name] if name == "tiny_chain" else ("relu", "add"))


def test_device_result_is_the_crossing_tensors(built):
    name, model, x, table, out, manifest = built
    res = load(out, "device").run("e0/mid", {"x": x.numpy()})
    assert not res.done and set(res.outputs) == set(manifest.routes["e0/mid"].crossing)
    assert res.seconds > 0
    part = load(out, "device")
    assert part.fallback_plan_id == "e0/device" and part.input_names == ("x",)


def test_bad_requests(built):
    name, model, x, table, out, manifest = built
    dev, edge = load(out, "device"), load(out, "edge")
    with pytest.raises(ArtifactError, match="unknown plan id"):
        dev.run("e9/nowhere", {"x": x.numpy()})
    with pytest.raises(ArtifactError, match="expected tensors"):
        dev.run("e0/mid", {"y": x.numpy()})
    with pytest.raises(ArtifactError, match="float64"):
        dev.run("e0/mid", {"x": x.numpy().astype(np.float64)})
    with pytest.raises(ArtifactError, match=r"expected float32\[1, 3, 16, 16\]"):
        dev.run("e0/mid", {"x": np.zeros((1, 3, 8, 8), np.float32)})
    with pytest.raises(ArtifactError, match="device-only"):
        edge.run("e0/device", {})


def test_tampered_file_is_refused_and_named(built, tmp_path):
    import shutil

    name, model, x, table, out, manifest = built
    copy = tmp_path / "art"
    shutil.copytree(out, copy)
    params = copy / "device" / "seg0.params"
    data = bytearray(params.read_bytes())
    data[-1] ^= 0xFF
    params.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="seg0.params"):
        load(copy, "device")
    load(copy, "edge")                                   # the edge's files are intact
    assert cli(["check", str(copy)]) == 2


def test_newer_format_is_refused(built, tmp_path):
    import shutil

    name, model, x, table, out, manifest = built
    copy = tmp_path / "art"
    shutil.copytree(out, copy)
    d = msgpack.unpackb((copy / MANIFEST).read_bytes(), strict_map_key=False)
    d["format_version"] = FORMAT_VERSION + 1
    (copy / MANIFEST).write_bytes(msgpack.packb(d))
    with pytest.raises(ArtifactError, match="newer than this edgecut reads"):
        load(copy, "device")


def test_check_cli(built, capsys):
    name, model, x, table, out, manifest = built
    assert cli(["check", str(out)]) == 0
    text = capsys.readouterr().out
    assert "device (tvm): plan e0/device" in text and "edge (onnxruntime)" in text


def test_early_exit_and_synthesized_fallback(tmp_path):
    import edgecut

    model, x = zoo.get("tiny_chain"), torch.randn(1, 3, 16, 16)
    tv = insert_exits(edgecut.trace(model, x), ["pool1"])
    exits = tv.meta[meta.EXITS]
    table = make_table(tv, [(1, make_cut(tv, ["conv2"], "mid", 1)), (1, make_cut(tv, [], "input", 1))])
    want = [t.detach().numpy() for t in tv(x)]
    for threshold, fires in ((1e9, True), (0.0, False)):
        exits[0]["threshold"] = threshold
        out = tmp_path / f"t{threshold}"
        m = build_artifact(tv, table, "local", "local", out, (x,), onnx=False, progress=False)
        assert m.fallback.cut.name == "device" and m.fallback.exit == 0    # no device-only plan in the table
        res = load(out, "device").run("e1/mid", {"x": x.numpy()})
        assert res.done is fires and res.exit_id == (0 if fires else 1)
        if fires:
            assert max_error(res.outputs["logits"], want[0]) <= 1e-4
        res = chain(out, "e1/mid", x.numpy(), early_exit=False)
        assert res.exit_id == 1 and max_error(res.outputs["logits"], want[1]) <= 1e-4
        res = load(out, "device").run(m.fallback.id, {"x": x.numpy()})
        assert res.done and max_error(res.outputs["logits"], want[0]) <= 1e-4


def test_cuda_edge_compiles(tmp_path):
    import edgecut

    model, x = zoo.get("tiny_chain"), torch.randn(1, 3, 16, 16)
    gm = edgecut.trace(model, x)
    table = make_table(gm, three_cuts(gm, ["pool1"]))
    try:
        m = build_artifact(gm, table, "local", "cuda", tmp_path, (x,), onnx=False, progress=False)
    except CodegenError as e:
        pytest.skip(f"this TVM wheel cannot compile for CUDA: {e}")
    assert '"kind":"cuda"' in m.libraries_of("edge")["seg0"].tvm_target
    import tvm

    if not tvm.cuda(0).exist:
        return                                           # compiled only; it runs where a GPU is lent
    res = chain(tmp_path, "e0/mid", x.numpy())
    assert max_error(res.outputs["logits"], model(x).detach().numpy()) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.names())
def test_zoo_three_cuts_reproduce_pytorch(name, tmp_path):
    """Every zoo model, edge-only / middle / device-only: chained segments match PyTorch (fp32)."""
    import edgecut

    shape = zoo.default_input_shape(name)
    model = zoo.settle_batchnorm(zoo.get(name), (2, *shape[1:]))   # logits that depend on x
    x = torch.randn(*shape)
    gm = edgecut.trace(model, x)
    calls = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    table = make_table(gm, three_cuts(gm, [calls[len(calls) // 2]]))
    build_artifact(gm, table, "local", "local", tmp_path, (x,), onnx=False, progress=False)
    want = model(x).detach().numpy()
    for plan in table.plans:
        res = chain(tmp_path, plan.id, x.numpy())
        assert res.done and max_error(res.outputs["logits"], want) <= 1e-4, (name, plan.id)


def test_manifest_candidates_round_trip_and_old_manifests(built):
    name, model, x, table, out, manifest = built
    assert {p.id for p in manifest.candidates} == {p.id for p in (*table.plans, manifest.fallback)}
    assert set(manifest.routes) == {p.id for p in manifest.candidates}
    assert Manifest.from_dict(manifest.to_dict()).candidates == manifest.candidates
    old = manifest.to_dict()
    del old["candidates"]
    for seg in old["segments"]:
        del seg["macs"]
    for lib in old["libraries"]:
        del lib["weights"]
    again = Manifest.from_dict(old)         # written before candidates: the table's plans and the fallback
    assert [p.id for p in again.candidates] == list(dict.fromkeys(p.id for p in (*table.plans, manifest.fallback)))
    assert all(s.macs == 0 for s in again.segments) and all(lib.weights == "" for lib in again.libraries)


def test_a_route_calls_one_library_per_check_span_however_many_cuts(tmp_path):
    """tiny_chain with an exit after pool1 (checked, never firing) and cuts all along
    the backbone: each route calls its device spans, one head per check, and one edge library."""
    import edgecut

    model, x = zoo.get("tiny_chain"), torch.randn(1, 3, 16, 16)
    tv = insert_exits(edgecut.trace(model, x), ["pool1"])
    tv.meta[meta.EXITS][0]["threshold"] = 0.0          # entropy is never below 0: the head runs, never stops
    names = ["relu1", "pool1", "relu2", "fc"]
    cuts = [(1, make_cut(tv, [], "input", 1))] + [(1, make_cut(tv, [n], n, 1)) for n in names]
    m = build_artifact(tv, make_table(tv, cuts), "local", "local", tmp_path / "a", (x,), onnx=False, progress=False)
    want = [t.detach().numpy() for t in tv(x)]
    calls = []
    dev, edge = load(tmp_path / "a", "device"), load(tmp_path / "a", "edge")
    for part in (dev, edge):
        part._run = {k: (lambda ins, fn=fn, k=k: calls.append(k) or fn(ins)) for k, fn in part._run.items()}
    for plan_id, r in m.routes.items():
        calls.clear()
        res = dev.run(plan_id, {"x": x.numpy()})
        if not res.done:
            res = edge.run(plan_id, res.outputs)
        assert res.exit_id == r.exit and max_error(res.outputs["logits"], want[r.exit]) <= 1e-4, plan_id
        on_device = {n for s in m.segments if s.name in r.device for n in s.nodes}
        spans = 0 if not on_device else 2 if "conv2" in on_device else 1   # split at exit 0's branch point only
        assert len(r.device) == spans and len(r.checks) == ("pool1" in on_device), plan_id
        assert len(calls) == spans + len(r.checks) + (1 if r.edge else 0), plan_id
