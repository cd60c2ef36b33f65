import pytest
import torch

import edgecut
from edgecut import zoo
from edgecut.cli.inspect import totals

# torchvision's parameter counts, and published GMACs at 224x224
PUBLISHED = {
    "alexnet": (61_100_840, 0.71),
    "vgg16": (138_357_544, 15.47),
    "resnet18": (11_689_512, 1.81),
    "mobilenet_v2": (3_504_872, 0.30),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_params_and_macs_match_torchvision(name):
    params, gmacs = PUBLISHED[name]
    m = zoo.get(name)
    assert sum(p.numel() for p in m.parameters()) == params
    gm = edgecut.trace(m, torch.randn(1, 3, 224, 224))
    t = totals(gm)
    assert t["params"] == params
    assert abs(t["macs"] / 1e9 - gmacs) / gmacs < 0.03


@pytest.mark.parametrize("name", zoo.names())
def test_every_zoo_model_traces_to_eager_output(name):
    m = zoo.get(name)
    shape = zoo.default_input_shape(name)
    if name == "vgg16":
        shape = (1, 3, 64, 64)  # same graph, smaller activations keep the test quick
    x = torch.randn(*shape)
    gm = edgecut.trace(m, x)
    with torch.no_grad():
        assert torch.equal(gm(x), m(x))


def test_load_spec_from_file(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text("from torch import nn\ndef Net():\n    return nn.Sequential(nn.Linear(4, 2))\n")
    model, name, shape = zoo.load_spec(f"{f}:Net")
    assert name == "Net" and shape is None
    assert sum(p.numel() for p in model.parameters()) == 10


def test_settled_batchnorm_makes_mobilenet_logits_depend_on_the_input():
    """Fresh MobileNetV2 in eval mode: the logits are the classifier bias (what a numeric check
    of a compiled copy would then compare); settled, they follow the input."""
    import torch

    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    fresh = zoo.get("mobilenet_v2")
    settled = zoo.settle_batchnorm(zoo.get("mobilenet_v2"), (2, 3, 64, 64))
    with torch.no_grad():
        spread = lambda m: float((m(x) - m(2 * x)).abs().max() / m(x).abs().max())  # noqa: E731
        assert spread(fresh) < 1e-3 < 0.1 < spread(settled)
    assert not settled.training


def test_the_demo_model_has_a_small_tensor_in_the_middle():
    """zoo.alexnet_edgent at 64x64: input 48 KiB, pool1 12.25 KiB, pool3 1 KiB (what makes a
    partition in the middle worth it), ~32 M MACs."""
    from edgecut.frontend import meta

    gm = edgecut.trace(zoo.get("alexnet_edgent"), torch.randn(*zoo.default_input_shape("alexnet_edgent")))
    size = {n.name: n.meta[meta.OUT_BYTES] for n in gm.graph.nodes}
    assert (size["x"], size["features_2"], size["features_12"]) == (48 * 1024, 3136 * 4, 1024)
    assert 30e6 < totals(gm)["macs"] < 34e6
