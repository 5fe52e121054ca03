import torch, torch.distributed as dist
from .spawn import run_ranks
def f(rank, world):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return float(t)
def test_spawn(tmp_path):
    assert run_ranks(f, 2, tmp_path) == [3.0, 3.0]
