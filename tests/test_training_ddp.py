"""Two CPU processes (gloo): masks start different per rank, end identical after broadcast, and stay so
through DDP training with SET drop-and-grow."""

from __future__ import annotations

import gc
import os
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sparsecraft.training import DropAndGrow, DropAndGrowConfig, MaskState


def _worker(rank: int, world: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # a file store, not a TCP port: no race for a free port with other jobs on the machine; a rank left alone gives
    # up after the timeout instead of hanging the test run
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    try:
        torch.manual_seed(0)  # same init weights everywhere
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        g = torch.Generator().manual_seed(100 + rank)  # different masks per rank on purpose
        keep = {fqn: torch.rand(model.get_submodule(fqn).weight.shape, generator=g) > 0.7 for fqn in ("0", "2")}
        state = MaskState(model, keep=keep)
        state.broadcast_(src=0)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.1)
        state.bind(opt)
        dst = DropAndGrow(state, opt, DropAndGrowConfig(grow="random", frequency=3, end_step=12, seed=rank))
        data = torch.Generator().manual_seed(7 + rank)
        for step in range(12):
            x, y = torch.randn(8, 16, generator=data), torch.randint(0, 4, (8,), generator=data)
            loss = nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            dst.step(step)
        torch.save({"masks": state.masks(), "weights": {k: v.detach() for k, v in model.state_dict().items()},
                    "updates": len(dst.history)}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # every rank's collectives done before teardown
        # Free DDP (its reducer holds the process group) while the group is alive: when the reducer's dealloc drops
        # the last reference, gloo's destructor joins a worker thread that waits for the GIL the dealloc holds, and
        # the rank hangs at exit (seen here once in a few runs).
        del dst, opt, ddp
        gc.collect()
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_masks_identical() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.spawn(_worker, args=(2, tmp), nprocs=2, join=False)
        deadline = time.monotonic() + 300
        while not ctx.join(timeout=5):  # never hang the test run: a stuck rank fails the test
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                pytest.fail("the 2-rank gloo run did not finish within 300 s (a rank hung)")
        r0, r1 = (torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in (0, 1))
    assert r0["updates"] == r1["updates"] == 3  # steps 3, 6, 9
    for fqn in ("0", "2"):
        assert torch.equal(r0["masks"][fqn], r1["masks"][fqn])
        assert torch.equal(r0["weights"][f"{fqn}.weight"], r1["weights"][f"{fqn}.weight"])
        assert torch.count_nonzero(r0["weights"][f"{fqn}.weight"][~r0["masks"][fqn]]) == 0
    # rank 0's initial density (~30%) is kept exactly by drop-and-grow
    g = torch.Generator().manual_seed(100)
    first = torch.rand(32, 16, generator=g) > 0.7
    assert int(r0["masks"]["0"].sum()) == int(first.sum())
