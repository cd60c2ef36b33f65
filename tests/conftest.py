import os

import pytest
import torch

# Two threads, as the benchmarks and CI machine use; deterministic seeds.
torch.set_num_threads(int(os.environ.get("EDGECUT_THREADS", "2")))
os.environ.setdefault("TVM_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
