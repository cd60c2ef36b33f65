"""Shape-only values fold into constants; models that return a tuple or a dict."""
import pytest
import torch
from torch import nn

import edgecut
from edgecut.errors import TraceError
from edgecut.frontend import meta as M
from edgecut.frontend.tracing import require_one_output
from edgecut.passes import verify


class ShapeChecks(nn.Module):
    """What timm's models do: assert the input size, read B, N, C = x.shape for a reshape."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, stride=4)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        b, c, h, w = x.shape
        torch._assert(h == 16, "the height is not 16")
        t = self.proj(x).flatten(2).transpose(1, 2)
        n = t.size(1)
        t = self.fc(t).reshape(b, n, 2, 4).permute(0, 2, 1, 3)
        return t.reshape(b, t.dim() * 8, -1).mean(-1)


def test_shape_values_become_constants_and_asserts_go():
    m, x = ShapeChecks().eval(), torch.randn(2, 3, 16, 16)
    gm = edgecut.trace(m, x)
    assert gm.meta[M.TRACER] == "fx"
    verify(gm)                                        # no dead getitem of a shape left behind
    non_tensor = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")
                  and n.meta[M.SHAPE] is None]
    assert non_tensor == []
    assert torch.equal(gm(x), m(x))
    assert "_assert" not in gm.code and "getattr" not in gm.code


class Heads(nn.Module):
    def __init__(self, as_dict):
        super().__init__()
        self.body, self.cls, self.box = nn.Conv2d(3, 4, 3), nn.Linear(4, 5), nn.Linear(4, 2)
        self.as_dict = as_dict

    def forward(self, x):
        f = self.body(x).mean((2, 3))
        return {"logits": self.cls(f), "boxes": self.box(f)} if self.as_dict else (self.cls(f), self.box(f))


@pytest.mark.parametrize("as_dict,key,kind", [(True, "logits", "a dict (keys 'logits', 'boxes')"),
                                              (False, 0, "a tuple of 2 values")])
def test_several_outputs_one_line_error_or_the_chosen_one(as_dict, key, kind):
    m, x = Heads(as_dict).eval(), torch.randn(1, 3, 8, 8)
    with pytest.raises(TraceError) as e:
        require_one_output(edgecut.trace(m, x))
    assert str(e.value) == (f"Heads returns {kind}, not one tensor: say which is the logits with "
                            "edgecut.trace(model, x, output=KEY_OR_INDEX), or wrap the model")
    gm = edgecut.trace(m, x, output=key)
    assert torch.equal(gm(x), m(x)[key])
    assert not any(n.target == "box" for n in gm.graph.nodes)     # the other head is gone
    with pytest.raises(TraceError, match="no output 'scores'"):
        edgecut.trace(m, x, output="scores")


def test_compile_refuses_a_dict_output_before_any_work():
    with pytest.raises(TraceError, match="returns a dict"):
        edgecut.compile(Heads(True).eval(), torch.randn(1, 3, 8, 8), target="local", exits=None)


class OptionalMask(nn.Module):
    """timm's ViT: forward(x, attn_mask=None); the example gives x only."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, attn_mask=None):
        q = self.fc(x).unsqueeze(1)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=attn_mask).squeeze(1)


def test_inputs_left_out_take_their_defaults():
    m, x = OptionalMask().eval(), torch.randn(1, 4, 8)
    gm = edgecut.trace(m, x)
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    assert torch.equal(gm(x), m(x))
    assert next(n for n in gm.graph.nodes if n.meta[M.KIND] == M.ATTENTION).kwargs["attn_mask"] is None
