"""Models defined in the project (there is no CPU torchvision here), with torchvision's layouts.

`get(name, **kwargs)` builds one; `load_spec("edgecut.zoo:NAME" | "path/file.py:Factory")`
resolves the model strings the CLI takes. Weights are randomly initialised: nothing is
downloaded. Each entry has a default input shape.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

from torch import nn

from edgecut.errors import UsageError
from edgecut.zoo.alexnet import AlexNet, AlexNetCifar, AlexNetEdgent
from edgecut.zoo.mobilenet import MobileNetV2
from edgecut.zoo.resnet import ResNet
from edgecut.zoo.tiny import TinyChain, TinyDAG
from edgecut.zoo.vgg import VGG

# name -> (factory, default input shape)
MODELS: dict[str, tuple[Callable[..., nn.Module], tuple]] = {
    "alexnet": (AlexNet, (1, 3, 224, 224)),
    "alexnet_cifar": (AlexNetCifar, (1, 3, 32, 32)),
    "alexnet_edgent": (AlexNetEdgent, (1, 3, 64, 64)),
    "vgg16": (VGG, (1, 3, 224, 224)),
    "resnet18": (ResNet, (1, 3, 224, 224)),
    "mobilenet_v2": (MobileNetV2, (1, 3, 224, 224)),
    "tiny_chain": (TinyChain, (1, 3, 16, 16)),
    "tiny_dag": (TinyDAG, (1, 3, 16, 16)),
}


def names() -> list[str]:
    return sorted(MODELS)


def get(name: str, **kwargs) -> nn.Module:
    """Build zoo model `name` in eval mode."""
    try:
        factory, _ = MODELS[name]
    except KeyError:
        raise UsageError(f"unknown zoo model {name!r}; known: {', '.join(names())}") from None
    return factory(**kwargs).eval()


def settle_batchnorm(model: nn.Module, shape: tuple, batches: int = 4, seed: int = 0) -> nn.Module:
    """Give every BatchNorm the running statistics of random inputs of `shape` (their cumulative
    average over `batches` forward passes in training mode), as training would, and return the
    model in eval mode. A freshly initialised network in eval mode normalises with mean 0 and
    variance 1, so its activations can shrink layer by layer until the output is the last bias
    whatever the input (MobileNetV2: ~1e-7 before the classifier), and comparing a compiled copy
    with it checks nothing; settled, every layer carries signal."""
    import torch

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None                      # cumulative average
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(*shape, generator=gen))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return model.eval()


def vary_constant_parameters(model: nn.Module, seed: int = 0, only_vanishing: bool = False) -> list[str]:
    """Give every parameter that its initialiser set to one value for all elements (zero-initialised
    classifier heads, BatchNorm and LayerNorm weights and biases, zero-initialised last BN of a
    residual branch, layer scales of 1e-6, skip gains of 0) random values of a trained network's
    kind: biases N(0, 0.1), other vectors U(0.5, 1.5), matrices and kernels N(0, 1/fan_in). A
    branch multiplied by 0 or 1e-6 hides whatever its layers compute, and a zero head makes every
    output 0: comparing a compiled copy with such a model checks little or nothing (timm's gMLP,
    ResMLP: logits all 0; its ResNets, ConvNeXts: residual branches at 0 or 1e-6).
    `only_vanishing`: change only the ones that make a path vanish (weights, gains and scales
    below 1e-3), not unit norms or zero biases. Returns the names of the parameters changed."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    changed = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            if flat.numel() < 2 or not p.is_floating_point() or not bool((flat == flat[0]).all()):
                continue
            if only_vanishing and (name.endswith("bias") or abs(float(flat[0])) >= 1e-3):
                continue
            if p.dim() == 1 and name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif p.dim() <= 1 or p[0].numel() == 1:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            changed.append(name)
    return changed


def default_input_shape(name: str) -> tuple | None:
    return MODELS[name][1] if name in MODELS else None


def load_spec(spec: str) -> tuple[nn.Module, str, tuple | None]:
    """Resolve "edgecut.zoo:NAME" or "path/to/file.py:Factory" to (model, name, default shape).
    `Factory` is a class or function called with no arguments."""
    if ":" not in spec:
        raise UsageError(f"bad model {spec!r}: expected 'edgecut.zoo:NAME' or 'path/to/file.py:Factory'")
    where, _, attr = spec.rpartition(":")
    if not attr:
        raise UsageError(f"bad model {spec!r}: nothing after ':'")
    if where in ("edgecut.zoo", "zoo"):
        return get(attr), attr, default_input_shape(attr)
    path = Path(where)
    if path.suffix != ".py" or not path.is_file():
        raise UsageError(f"bad model {spec!r}: {where!r} is neither 'edgecut.zoo' nor an existing .py file")
    mod_spec = importlib.util.spec_from_file_location(f"edgecut_user_{path.stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:
        raise UsageError(f"bad model {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    factory = getattr(module, attr, None)
    if factory is None:
        raise UsageError(f"bad model {spec!r}: {path} has no {attr!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise UsageError(f"bad model {spec!r}: {attr}() returned {type(model).__name__}, not an nn.Module")
    return model.eval(), attr, None
