"""The corpus of bench/corpus.py: its list, and its fast subset end to end (compile, every table
plan, split equals whole at every find_cuts candidate). The full corpus is a bench run."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import corpus  # noqa: E402

FAMILIES = {"ResNet", "ResNeXt", "RegNet", "EfficientNet", "EfficientNetV2", "MobileNetV3", "GhostNet", "ConvNeXt",
            "DenseNet", "Inception", "VGG", "ViT", "DeiT", "Swin", "MobileViT", "EfficientFormer"}


def test_the_corpus_spans_the_families_and_exists_in_timm():
    corpus._stub_torchvision_ops()
    import timm

    assert len(corpus.CORPUS) >= 40
    assert FAMILIES <= {family for family, *_ in corpus.CORPUS.values()}
    assert set(corpus.CORPUS) <= set(timm.list_models())
    settled = [settle for _, _, settle, _ in corpus.CORPUS.values()]
    assert 0 < settled.count(False) < len(settled) / 2      # some kept as initialised


def test_rows_and_the_summary_line():
    ok = {"name": "a", "compiles": True, "cuts": 3, "cuts_ok": 3, "worst": 1e-6, "compile_s": 10.0}
    bad = {"name": "b", "compiles": True, "cuts": 3, "cuts_ok": 2, "worst": 0.5, "compile_s": 30.0}
    dead = {"name": "c", "compiles": False, "cause": "compile: CodegenError: x"}
    assert corpus.summary([ok, bad, dead]) == ("slowest compile 30 s (b)\n"
                                               "corpus: 2/3 compile, 1/3 split-equals-whole at every cut, "
                                               "median compile 20 s")
    assert "compile: CodegenError: x" in corpus.format_row(dead)


@pytest.mark.parametrize("name", [
    "vit_tiny_patch16_224",
    "resnet10t",
    pytest.param("mobilenetv3_small_050", marks=pytest.mark.slow),
    pytest.param("convnext_atto", marks=pytest.mark.slow)])
def test_fast_subset_splits_equal_the_whole_at_every_cut(name, tmp_path):
    row = corpus.check_model(name, corpus.FAST[name], tmp_path, device_target="local")
    assert row["compiles"], row.get("trace", row["cause"])
    assert row["cuts"] >= 5 and row["cuts_ok"] == row["cuts"], row["cause"]
    assert row["worst"] <= corpus.TOLERANCE and row["table_worst"] <= corpus.TOLERANCE
    assert corpus.split_ok(row)


def test_constant_parameters_get_random_values_so_the_check_sees_every_layer():
    """timm zero-initialises gMLP's head (every logit 0) and sets ConvNeXt's layer scales to 1e-6:
    a compiled copy compared with that checks nothing in those branches."""
    import torch

    corpus._stub_torchvision_ops()
    import timm

    from edgecut import zoo

    torch.manual_seed(0)
    model = timm.create_model("gmlp_ti16_224", pretrained=False, img_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    assert float(model(x).detach().abs().max()) == 0.0            # as timm initialises it
    changed = zoo.vary_constant_parameters(model)
    assert "head.weight" in changed and "blocks.0.norm.weight" in changed
    assert float(model(x).detach().std()) > 0.01
    assert zoo.vary_constant_parameters(model) == []               # nothing constant left
