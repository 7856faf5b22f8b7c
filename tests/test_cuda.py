"""GPU path: where cached activations live (runs everywhere), and the prune itself on CUDA against the CPU run.

The CUDA tests need a GPU and are skipped without one (issue 16 asks for exactly that); `bench/gpu_check.py` runs
them on a GPU machine together with the SmolLM2 comparison.
"""

from __future__ import annotations

import pytest
import torch

from sparsecraft.api import prune
from sparsecraft.engine.capture import auto_offload, resolve_offload

from conftest import tiny_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run bench/gpu_check.py)")


def test_offload_auto_is_cpu_for_a_cpu_device():
    assert resolve_offload("auto", "cpu", 10) == torch.device("cpu")
    assert resolve_offload("cpu", "cuda", 10) == torch.device("cpu")  # an explicit choice is kept
    assert resolve_offload("cuda:1", "cpu", 10) == torch.device("cuda:1")


def test_offload_auto_follows_free_gpu_memory(monkeypatch):
    free = {"bytes": 3000}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 10**9))
    assert resolve_offload("auto", "cuda:0", 1000) == torch.device("cuda:0")  # 3 x 1000 fits in 3000
    assert resolve_offload("auto", "cuda:0", 1001) == torch.device("cpu")
    # 4 windows x 16 tokens x hidden 32 x 4 bytes (float32) = 8192 bytes of cached hidden states
    model = tiny_model("llama")
    batches = [{"input_ids": torch.zeros(2, 16, dtype=torch.long)}] * 2
    free["bytes"] = 3 * 8192
    assert auto_offload(model, batches, "cuda", torch.float32) == torch.device("cuda")
    free["bytes"] = 3 * 8192 - 1
    assert auto_offload(model, batches, "cuda", torch.float32) == torch.device("cpu")
    free["bytes"] = 3 * 4096  # bfloat16 halves it
    assert auto_offload(model, batches, "cuda", torch.bfloat16) == torch.device("cuda")


@needs_cuda
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_on_cuda_matches_cpu(calib, method):
    cpu_model, gpu_model = tiny_model("llama"), tiny_model("llama")
    cpu = prune(cpu_model, method, 0.5, calibration=calib, device="cpu", progress=False)
    torch.cuda.reset_peak_memory_stats()
    gpu = prune(gpu_model, method, 0.5, calibration=calib, device="cuda", progress=False)
    assert torch.cuda.max_memory_allocated() > 0
    assert next(gpu_model.parameters()).device.type == "cpu"  # blocks go back after their turn
    for fqn, keep in cpu.masks.items():
        assert gpu.masks[fqn].sum() == keep.sum()  # exact per-layer sparsity on both
        agree = (gpu.masks[fqn].cpu() == keep).float().mean().item()
        if method == "sparsegpt":  # OBS updates in another summation order can flip near-ties
            assert agree > 0.97, (fqn, agree)
        else:  # scores are elementwise products / norms: the same up to rounding of exact ties
            assert agree > 0.995, (fqn, agree)
    for (n, a), (_, b) in zip(cpu_model.named_parameters(), gpu_model.named_parameters()):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-3, atol=1e-4, msg=n)
