import os

# Idle OpenMP threads sleep instead of spinning: on a 2-core machine shared by test processes,
# spinning workers burn the CPU the other process needs (exit training ran 3-10x slower).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two threads, as the benchmarks and CI machine use; deterministic seeds.
torch.set_num_threads(int(os.environ.get("EDGECUT_THREADS", "2")))
os.environ.setdefault("TVM_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
