"""Batch-N edge libraries (codegen/batches.py) and Part.run_batch: a real TVM build of tiny_chain."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import build_exit_artifact

from edgecut.codegen.load import load
from edgecut.codegen.manifest import Manifest


@pytest.fixture(scope="module")
def batched_artifact(tmp_path_factory):
    return build_exit_artifact(tmp_path_factory.mktemp("batched") / "art", edge_batches=(4,))


def test_batch_libraries_built_and_equal_to_batch_one(batched_artifact):
    path, x = batched_artifact
    m = Manifest.read(path)
    assert m.batch_sizes("edge") == (4,) and m.batch_sizes("device") == ()
    four = m.libraries_of("edge", "tvm", 4)
    assert set(four) == set(m.libraries_of("edge", "tvm"))         # every edge segment, at batch 4 too
    assert all(lib.file.endswith(".b4.so") for lib in four.values())
    device, edge = load(path, side="device"), load(path, side="edge")
    rng = np.random.default_rng(0)
    for plan in ("e1/input", "e1/mid"):
        reqs = []
        for _ in range(6):              # a batch of 4, then 2 padded to 4
            xi = (x + rng.standard_normal(x.shape).astype(np.float32)).astype(np.float32)
            reqs.append(device.run(plan, {"x": xi}, early_exit=False).outputs)
        got = edge.run_batch(plan, reqs)
        assert len(got) == 6
        for r, t in zip(got, reqs):
            want = edge.run(plan, t).outputs["logits"]
            assert r.done and r.outputs["logits"].shape == want.shape
            assert np.abs(r.outputs["logits"] - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_run_batch_refuses_a_bad_request(batched_artifact):
    from edgecut.errors import ArtifactError

    path, x = batched_artifact
    device, edge = load(path, side="device"), load(path, side="edge")
    good = device.run("e1/mid", {"x": x}, early_exit=False).outputs
    bad = {k: v[..., :-1] for k, v in good.items()}
    with pytest.raises(ArtifactError, match="expected"):
        edge.run_batch("e1/mid", [good, bad])
