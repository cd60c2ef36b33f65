"""insert_exits / lower_exit on tiny traced models: structure and numerics asserted."""
import pytest
import torch
import torch.fx as fx
from torch import nn

import edgecut
from edgecut import zoo
from edgecut.errors import ExitError
from edgecut.frontend import meta as M
from edgecut.passes import insert_exits, lower_exit, valid_exit_points, verify


def traced(name, batch=1):
    shape = zoo.default_input_shape(name)
    model = zoo.get(name)
    return model, edgecut.trace(model, torch.randn(batch, *shape[1:]))


def head_nodes(gm, exit_id):
    return [n for n in gm.graph.nodes if n.meta.get(M.EXIT_ID) == exit_id]


def test_chain_structure_and_numerics():
    model, gm = traced("tiny_chain")
    before = gm.code
    t = verify(insert_exits(gm, ["pool1"]))
    assert gm.code == before and M.EXITS not in gm.meta       # the input graph is untouched
    out = next(n for n in t.graph.nodes if n.op == "output")
    logits = out.args[0]
    assert isinstance(logits, tuple) and len(logits) == 2
    head = head_nodes(t, 0)
    assert [type(t.get_submodule(n.target)).__name__ for n in head] == \
        ["Conv2d", "ReLU", "AvgPool2d", "Flatten", "Linear"]
    assert head[0].args[0].name == "pool1" and logits[0] is head[-1] and logits[1].name == "fc"
    by_name = {n.name: n for n in t.graph.nodes}
    assert by_name["pool1"].meta[M.EXIT_POINT] == 0 and by_name["fc"].meta[M.EXIT_POINT] == 1
    assert all(M.EXIT_ID not in n.meta for n in t.graph.nodes if n not in head)
    assert all(M.MACS in n.meta and M.SHAPE in n.meta for n in t.graph.nodes)   # re-analysed
    exits = t.meta[M.EXITS]
    assert [(e["id"], e["point"], e["output"]) for e in exits] == [(0, "pool1", head[-1].name), (1, "fc", "fc")]
    total = sum(n.meta[M.MACS] for n in gm.graph.nodes)
    head_macs = sum(n.meta[M.MACS] for n in head)
    upto = sum(gm.graph.find_nodes(op="call_module", target=m)[0].meta[M.MACS] for m in ("conv1", "relu1", "pool1"))
    assert exits[1]["macs"] == total and exits[0]["macs"] == upto + head_macs
    x = torch.randn(4, 3, 16, 16)
    t.eval()
    with torch.no_grad():
        z = t(x)
        assert z[0].shape == (4, 10) and torch.equal(z[1], model(x))


def test_residual_model_valid_points_and_errors():
    _, gm = traced("tiny_dag")
    assert valid_exit_points(gm) == ["stem", "relu", "cat", "c", "relu_2", "pool", "flatten"]
    for bad in ("add", "a", "relu_1", "b"):       # inside the residual block / one arm of the concat
        with pytest.raises(ExitError, match=f"after node '{bad}'.*valid exit points: stem, relu, cat"):
            insert_exits(gm, [bad])
    with pytest.raises(ExitError, match="no node named 'nope'.*stem, relu, cat"):
        insert_exits(gm, ["nope"])
    with pytest.raises(ExitError, match="'fc'"):   # the final output is the last exit already
        insert_exits(gm, ["fc"])
    t = verify(insert_exits(gm, ["cat", "relu"]))   # order given does not matter
    assert [e["point"] for e in t.meta[M.EXITS]] == ["relu", "cat", "fc"]
    assert head_nodes(t, 0)[0].args[0].name == "relu" and head_nodes(t, 1)[0].args[0].name == "cat"
    with pytest.raises(ExitError, match="already has exits"):
        insert_exits(t, ["relu"])


def test_auto_alexnet_cifar_gives_five_small_exits():
    model, gm = traced("alexnet_cifar")
    t = verify(insert_exits(gm))
    exits = t.meta[M.EXITS]
    assert len(exits) == 5 and exits[-1]["point"] == "classifier_7"
    macs = [e["macs"] for e in exits]
    assert macs == sorted(macs) and len(set(macs)) == 5
    for e in exits[:-1]:
        head = sum(n.meta[M.MACS] for n in head_nodes(t, e["id"]))
        assert 0 < head <= 0.35 * (e["macs"] - head), e      # a head is small next to the work before it
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(t.eval()(x)[-1], model(x))


def test_lower_exit_keeps_numerics_and_removes_the_rest():
    _, gm = traced("tiny_dag")
    t = insert_exits(gm, ["relu", "cat"])
    for p in t.parameters():   # make every head matter numerically
        nn.init.normal_(p)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = t.eval()(x)
    for i in range(3):
        low = verify(lower_exit(t, i))
        with torch.no_grad():
            assert torch.equal(low(x), want[i])
        names = {n.name for n in low.graph.nodes}
        assert not any(n.meta.get(M.EXIT_ID) not in (None, i) for n in low.graph.nodes)
        assert low.meta[M.EXIT] == i and low.meta[M.EXITS] == t.meta[M.EXITS]
        assert all(n.op in ("placeholder", "output", "call_module", "call_function", "call_method")
                   for n in low.graph.nodes)
        assert all(M.MACS in n.meta for n in low.graph.nodes)
        heads = {name for name, _ in low.named_children() if name.startswith("edgecut_exit")}
        assert heads == ({f"edgecut_exit{i}"} if i < 2 else set())
        if i == 0:
            assert not names & {"a", "add", "cat", "c", "fc"}     # the backbone after the point is gone
            assert not hasattr(low, "fc")
    assert torch.equal(lower_exit(t, -1)(x), want[-1])
    with pytest.raises(ExitError, match=r"no exit 3; this model has exits \[0, 1, 2\]"):
        lower_exit(t, 3)
    with pytest.raises(ExitError, match="insert_exits first"):
        lower_exit(gm, 0)


def test_exit_before_inplace_relu_trains():
    model, gm = traced("alexnet_cifar")
    t = insert_exits(gm, ["features_0"])     # features_1 is ReLU(inplace=True)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss = sum(nn.functional.cross_entropy(z, y) for z in t.train()(x))
    loss.backward()       # would fail if the ReLU overwrote the conv output the head saved
    assert model.features[1].inplace is True      # the user's model is untouched
    with torch.no_grad():
        t.eval()
        assert torch.equal(lower_exit(t, 0)(x), t(x)[0])


def test_no_points_and_custom_head():
    model, gm = traced("tiny_chain")
    t = verify(insert_exits(gm, []))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        (only,) = t.eval()(x)
        assert torch.equal(only, model(x))

    def linear_head(shape, classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(shape[1] * shape[2] * shape[3], classes))

    t = verify(insert_exits(gm, ["pool1"], head=linear_head))
    assert [type(t.get_submodule(n.target)).__name__ for n in head_nodes(t, 0)] == ["Flatten", "Linear"]
    with pytest.raises(ExitError, match=r"returns \(1, 3\), expected \(1, 10\)"):
        insert_exits(gm, ["pool1"], head=lambda s, c: linear_head(s, 3))


def test_needs_an_analysed_single_output_graph():
    gm = fx.symbolic_trace(zoo.get("tiny_chain"))
    with pytest.raises(ExitError, match="analysed graph"):
        insert_exits(gm)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # the TorchScript ONNX exporter's notice
def test_lowered_exit_compiles_with_tvm_and_onnx(tmp_path):
    import numpy as np
    import onnxruntime as ort
    import tvm
    from tvm import relax
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.torch import from_fx

    _, gm = traced("tiny_chain")
    low = lower_exit(insert_exits(gm, ["pool1"]), 0).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        want = low(x).numpy()
    mod, params = detach_params(from_fx(low, [((1, 3, 16, 16), "float32")], keep_params_as_input=True))
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy()), *[tvm.runtime.tensor(p.numpy()) for p in params["main"]])
    got = got if hasattr(got, "numpy") else got[0]
    assert np.abs(got.numpy() - want).max() < 1e-5
    path = str(tmp_path / "exit0.onnx")
    torch.onnx.export(low, (x,), path, dynamo=False)
    sess = ort.InferenceSession(path)
    assert np.abs(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0] - want).max() < 1e-5


class _ShapeBranch(nn.Module):
    """torch.fx cannot trace the branch on a shape: edgecut.trace falls back to torch.export."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(512, 10)

    def forward(self, x):
        if x.shape[1] == 3:
            x = torch.relu(self.c1(x))
        return self.fc(nn.functional.max_pool2d(torch.relu(self.c2(x)), 2).flatten(1))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_export_graph_gets_exits_and_trains_on_batches():
    model = _ShapeBranch().eval()
    gm = edgecut.trace(model, torch.randn(1, 3, 16, 16))
    assert gm.meta[M.TRACER] == "export"
    t = verify(insert_exits(gm, ["relu_1"]))
    x = torch.randn(4, 3, 16, 16)          # a batch of 4 through a graph traced with a batch of 1
    with torch.no_grad():
        z = t.eval()(x)
        assert len(z) == 2 and torch.allclose(z[-1], model(x), atol=1e-6)
        assert torch.equal(verify(lower_exit(t, 0))(x), z[0])
