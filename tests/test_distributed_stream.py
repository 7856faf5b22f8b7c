"""Two gloo processes on 127.0.0.1 (spawned here) prune a sharded tiny Llama with the streaming engine: the result
equals the single-process run (wanda: bit for bit; sparsegpt: Hessians reduced in another order, so weights within
float rounding and masks equal on this model), ranks that disagree on settings stop before any work, and a rank
that dies makes the other exit with a RankFailure; the run then resumes (here with one process)."""

from __future__ import annotations

import datetime
import os
import socket
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsecraft.engine.distributed import assign_layers
from sparsecraft.engine.stream import MasksOnDisk, prune_streaming

from test_stream import load, save_llama


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _calib() -> torch.Tensor:
    return torch.randint(2, 96, (5, 16), generator=torch.Generator().manual_seed(1))  # 3 batches of 2: uneven split


def _worker(rank: int, port: int, tmp: str, scenario: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    log = Path(tmp) / f"{scenario}.rank{rank}.txt"
    src, calib = Path(tmp) / "src", _calib()
    try:
        if scenario == "equal":
            try:  # rank 1 asks for another sparsity: both ranks must refuse before any work
                prune_streaming(src, Path(tmp) / "never", calibration=calib, sparsity=0.5 + 0.1 * rank,
                                batch_size=2, progress=False)
            except ValueError as e:
                log.write_text(f"settings: {e}\n")
            for method in ("wanda", "sparsegpt"):
                prune_streaming(src, Path(tmp) / f"dp-{method}", method=method, calibration=calib, batch_size=2,
                                progress=False)
        else:  # rank 1 dies right after block 0 is saved
            def die(i, _result):
                if rank == 1 and i == 0:
                    os._exit(3)
            prune_streaming(src, Path(tmp) / "dying", method="wanda", calibration=calib, batch_size=2,
                            progress=False, on_block_done=die)
    except Exception as e:
        with log.open("a") as f:
            f.write(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


def _spawn(tmp: Path, scenario: str) -> list[int | None]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp), scenario)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:
        if p.is_alive():
            p.kill()
    return [p.exitcode for p in procs]


def _single(tmp: Path, method: str, out: str, **kw) -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same thread count as the ranks: same block outputs per batch
    try:
        return prune_streaming(tmp / "src", tmp / out, method=method, calibration=_calib(), batch_size=2,
                               progress=False, **kw)
    finally:
        torch.set_num_threads(threads)


def test_two_ranks_equal_one_process_and_disagreeing_settings_stop(tmp_path):
    save_llama(tmp_path / "src", layers=3)
    assert _spawn(tmp_path, "equal") == [0, 0]
    for r in (0, 1):
        text = (tmp_path / f"equal.rank{r}.txt").read_text()
        assert text.startswith("settings: ranks disagree on the settings of the run (rank 1: plan"), text
        assert "Error" not in text.split("\n", 1)[1], text
    assert not (tmp_path / "never").exists()
    for method in ("wanda", "sparsegpt"):
        one = _single(tmp_path, method, f"one-{method}")
        a, b = load(tmp_path / f"one-{method}").state_dict(), load(tmp_path / f"dp-{method}").state_dict()
        masks_two = MasksOnDisk(tmp_path / f"dp-{method}" / "masks.safetensors")
        for fqn in one.masks:
            assert torch.equal(one.masks[fqn], masks_two[fqn]), (method, fqn)
        for key in a:
            if method == "wanda":
                assert torch.equal(a[key], b[key]), key  # exact: norms summed in the same order
            else:
                torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)  # Hessian reduction order differs


def test_a_dying_rank_stops_the_other_and_the_run_resumes(tmp_path):
    save_llama(tmp_path / "src", layers=3)
    codes = _spawn(tmp_path, "dying")
    assert codes[1] == 3
    text = (tmp_path / "dying.rank0.txt").read_text()
    assert text.startswith("RankFailure: rank 0/2:") and "another rank died" in text and "resume" in text, text
    seen = []
    resumed = _single(tmp_path, "wanda", "dying", resume=True, on_block_done=lambda i, r: seen.append(i))
    assert seen == [1, 2]  # block 0 was finished by both ranks before rank 1 died
    whole = _single(tmp_path, "wanda", "whole")
    a, b = load(tmp_path / "whole").state_dict(), load(tmp_path / "dying").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(whole.masks[f], resumed.masks[f]) for f in whole.masks)


def test_layers_are_balanced_by_cost():
    shapes = {"q": (64, 64), "k": (16, 64), "up": (256, 64), "down": (64, 256)}
    owners = assign_layers(shapes, 2)
    assert owners == {"down": 0, "up": 1, "q": 1, "k": 1}  # 4.2M alone vs 1.05M + 0.26M + 0.07M
    assert assign_layers(shapes, 1) == dict.fromkeys(shapes, 0)
